"""sparsejax: sparse neural network training in JAX, as optax transformations."""

from sparsejax._src.distributions import ERK as ERK
from sparsejax._src.distributions import Global as Global
from sparsejax._src.distributions import Uniform as Uniform
from sparsejax._src.distributions import topk_masks as topk_masks
from sparsejax._src.masks import apply_masks as apply_masks
from sparsejax._src.masks import init_masks as init_masks
from sparsejax._src.masks import summary as summary
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
from sparsejax._src.sparsify import sparsify as sparsify
from sparsejax._src.topk import topk_mask as topk_mask

__version__ = "0.1.0"

__all__ = (
    "ERK",
    "Global",
    "SparsifyState",
    "SparsityMethod",
    "Uniform",
    "apply_masks",
    "get_masks",
    "init_masks",
    "magnitude",
    "nnx_filter",
    "one_shot",
    "path_pattern",
    "polynomial_schedule",
    "snip",
    "sparsify",
    "static_random",
    "summary",
    "topk_mask",
    "topk_masks",
)
