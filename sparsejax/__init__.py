"""sparsejax: sparse neural network training in JAX, as optax transformations."""

from sparsejax._src.distributions import ERK as ERK
from sparsejax._src.distributions import Global as Global
from sparsejax._src.distributions import Uniform as Uniform
from sparsejax._src.distributions import topk_masks as topk_masks
from sparsejax._src.dst import DropAndGrowState as DropAndGrowState
from sparsejax._src.dst import UpdateContext as UpdateContext
from sparsejax._src.dst import drop_and_grow as drop_and_grow
from sparsejax._src.dst import gradient_score as gradient_score
from sparsejax._src.dst import granet as granet
from sparsejax._src.dst import magnitude_score as magnitude_score
from sparsejax._src.dst import random_score as random_score
from sparsejax._src.dst import rigl as rigl
from sparsejax._src.dst import set_evolution as set_evolution
from sparsejax._src.granularity import Block as Block
from sparsejax._src.granularity import Channel as Channel
from sparsejax._src.granularity import block_mask as block_mask
from sparsejax._src.masks import apply_masks as apply_masks
from sparsejax._src.matmul.api import block_sparse_matmul as block_sparse_matmul
from sparsejax._src.matmul.format import BlockSparseMatrix as BlockSparseMatrix
from sparsejax._src.matmul.patterns import block_diagonal_mask as block_diagonal_mask
from sparsejax._src.matmul.patterns import butterfly_mask as butterfly_mask
from sparsejax._src.matmul.patterns import monarch_masks as monarch_masks
from sparsejax._src.masks import init_masks as init_masks
from sparsejax._src.masks import summary as summary
from sparsejax._src.n_m import NMCompressed as NMCompressed
from sparsejax._src.n_m import NMState as NMState
from sparsejax._src.n_m import compress_n_m as compress_n_m
from sparsejax._src.n_m import decompress_n_m as decompress_n_m
from sparsejax._src.n_m import mask_flips as mask_flips
from sparsejax._src.n_m import n_m as n_m
from sparsejax._src.n_m import n_m_mask as n_m_mask
from sparsejax._src.n_m import n_m_matmul as n_m_matmul
from sparsejax._src.n_m import piecewise as piecewise
from sparsejax._src.n_m import transposable_n_m_mask as transposable_n_m_mask
from sparsejax._src.pruning import magnitude as magnitude
from sparsejax._src.pruning import snip as snip
from sparsejax._src.pruning import static_random as static_random
from sparsejax._src.pytree import nnx_filter as nnx_filter
from sparsejax._src.pytree import path_pattern as path_pattern
from sparsejax._src.schedules import one_shot as one_shot
from sparsejax._src.schedules import polynomial_schedule as polynomial_schedule
from sparsejax._src.sparsify import SparsifyState as SparsifyState
from sparsejax._src.sparsify import SparsityMethod as SparsityMethod
from sparsejax._src.sparsify import get_masks as get_masks
from sparsejax._src.sparsify import sparse_params as sparse_params
from sparsejax._src.sparsify import sparsify as sparsify
from sparsejax._src.srigl import SRigLState as SRigLState
from sparsejax._src.srigl import srigl as srigl
from sparsejax._src.ste import masked_weight as masked_weight
from sparsejax._src.topk import topk_mask as topk_mask
from sparsejax import flax as flax  # sj.flax.BlockSparseLinear / BlockSparseDense

__version__ = "0.1.0"

__all__ = (
    "Block",
    "BlockSparseMatrix",
    "Channel",
    "DropAndGrowState",
    "ERK",
    "Global",
    "NMCompressed",
    "NMState",
    "SRigLState",
    "SparsifyState",
    "SparsityMethod",
    "Uniform",
    "UpdateContext",
    "apply_masks",
    "block_diagonal_mask",
    "block_mask",
    "block_sparse_matmul",
    "butterfly_mask",
    "compress_n_m",
    "decompress_n_m",
    "drop_and_grow",
    "flax",
    "get_masks",
    "gradient_score",
    "granet",
    "init_masks",
    "magnitude",
    "magnitude_score",
    "mask_flips",
    "masked_weight",
    "monarch_masks",
    "n_m",
    "n_m_mask",
    "n_m_matmul",
    "nnx_filter",
    "one_shot",
    "path_pattern",
    "piecewise",
    "polynomial_schedule",
    "random_score",
    "rigl",
    "set_evolution",
    "snip",
    "sparse_params",
    "sparsify",
    "srigl",
    "static_random",
    "summary",
    "topk_mask",
    "topk_masks",
    "transposable_n_m_mask",
)
