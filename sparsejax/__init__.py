"""sparsejax: sparse neural networks in JAX, trained through one optax wrapper.

The top level is the training API: `sparsify` and the sparsity methods, the
masks they keep, and the pieces methods are built from (schedules, scores,
distributions, granularity). Kernels and layers live in their own namespaces,
imported on first use: `sparsejax.attention` (block-sparse attention),
`sparsejax.matmul` (block-sparse and N:M matmuls and their formats) and
`sparsejax.nn` (Flax layers; the only module that imports flax) and
`sparsejax.prune` (post-training pruning of trained models).
"""

import importlib as _importlib

from sparsejax._src.calibration import Calibration as Calibration
from sparsejax._src.calibration import LayerStats as LayerStats
from sparsejax._src.calibration import calibrate as calibrate
from sparsejax._src.distributions import ERK as ERK
from sparsejax._src.distributions import Global as Global
from sparsejax._src.distributions import Uniform as Uniform
from sparsejax._src.distributions import masks_from_scores as masks_from_scores
from sparsejax._src.granularity import Block as Block
from sparsejax._src.granularity import Channel as Channel
from sparsejax._src.masks import apply_masks as apply_masks
from sparsejax._src.masks import init_masks as init_masks
from sparsejax._src.masks import mask_flips as mask_flips
from sparsejax._src.masks import summary as summary
from sparsejax._src.methods.dst import DropAndGrowState as DropAndGrowState
from sparsejax._src.methods.dst import drop_and_grow as drop_and_grow
from sparsejax._src.methods.dst import granet as granet
from sparsejax._src.methods.dst import rigl as rigl
from sparsejax._src.methods.dst import set_evolution as set_evolution
from sparsejax._src.methods.n_m import NMState as NMState
from sparsejax._src.methods.n_m import n_m as n_m
from sparsejax._src.methods.pruning import SnipState as SnipState
from sparsejax._src.methods.pruning import fixed as fixed
from sparsejax._src.methods.pruning import magnitude as magnitude
from sparsejax._src.methods.pruning import snip as snip
from sparsejax._src.methods.pruning import static_random as static_random
from sparsejax._src.methods.srigl import SRigLState as SRigLState
from sparsejax._src.methods.srigl import srigl as srigl
from sparsejax._src.n_m_masks import n_m_mask as n_m_mask
from sparsejax._src.n_m_masks import transposable_n_m_mask as transposable_n_m_mask
from sparsejax._src.pytree import nnx_filter as nnx_filter
from sparsejax._src.pytree import path_pattern as path_pattern
from sparsejax._src.schedules import cubic_schedule as cubic_schedule
from sparsejax._src.schedules import one_shot as one_shot
from sparsejax._src.schedules import piecewise as piecewise
from sparsejax._src.schedules import update_steps as update_steps
from sparsejax._src.scores import UpdateContext as UpdateContext
from sparsejax._src.scores import gradient_score as gradient_score
from sparsejax._src.scores import magnitude_score as magnitude_score
from sparsejax._src.scores import random_score as random_score
from sparsejax._src.scores import saliency_score as saliency_score
from sparsejax._src.sparsify import SparsifyState as SparsifyState
from sparsejax._src.sparsify import SparsityMethod as SparsityMethod
from sparsejax._src.sparsify import get_masks as get_masks
from sparsejax._src.sparsify import sparse_params as sparse_params
from sparsejax._src.sparsify import sparsify as sparsify
from sparsejax._src.ste import masked_weight as masked_weight
from sparsejax._src.topk import topk_mask as topk_mask

__version__ = "0.1.0"

_SUBMODULES = ("activations", "attention", "finetune", "matmul", "nn", "prune")


def __getattr__(name):
  # `sj.nn`, `sj.matmul`, `sj.attention`, `sj.finetune` and `sj.prune` import on first use, so that
  # `import sparsejax` stays light and never imports flax.
  if name in _SUBMODULES:
    return _importlib.import_module(f"sparsejax.{name}")
  raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


__all__ = (
    "Block",
    "Calibration",
    "Channel",
    "DropAndGrowState",
    "ERK",
    "Global",
    "LayerStats",
    "NMState",
    "SRigLState",
    "SnipState",
    "SparsifyState",
    "SparsityMethod",
    "Uniform",
    "UpdateContext",
    "apply_masks",
    "activations",
    "attention",
    "calibrate",
    "cubic_schedule",
    "drop_and_grow",
    "finetune",
    "fixed",
    "get_masks",
    "gradient_score",
    "granet",
    "init_masks",
    "magnitude",
    "magnitude_score",
    "mask_flips",
    "masked_weight",
    "masks_from_scores",
    "matmul",
    "n_m",
    "n_m_mask",
    "nn",
    "nnx_filter",
    "one_shot",
    "path_pattern",
    "piecewise",
    "prune",
    "random_score",
    "rigl",
    "saliency_score",
    "set_evolution",
    "snip",
    "sparse_params",
    "sparsify",
    "srigl",
    "static_random",
    "summary",
    "topk_mask",
    "transposable_n_m_mask",
    "update_steps",
)
