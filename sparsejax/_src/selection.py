"""Which units to keep, drop and grow: the selection rules shared by the methods.

All rules here are exact: ties go to the lower flat index, NaN scores rank
lowest, and counts are met to the unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import scores
from sparsejax._src import topk


def all_true(tree):
  """All-True masks of the shapes of `tree`'s leaves."""
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), tree)


def random_masks(params, sparsity, distribution, key, granularity=None):
  """Masks keeping a uniformly random share of each leaf, split by `distribution`."""
  return distributions.masks_from_scores(scores.random_scores(params, key), sparsity,
                                         distribution=distribution, granularity=granularity)


def admissible(score: jax.Array, allowed: jax.Array) -> jax.Array:
  """float32 scores of allowed units, finite or +inf; -inf for the rest."""
  lowest = jnp.finfo(jnp.float32).min
  s = score.astype(jnp.float32)
  s = jnp.where(jnp.isnan(s), lowest, jnp.maximum(s, lowest))
  return jnp.where(allowed, s, -jnp.inf)


def swap_count(fraction: jax.Array, active: jax.Array, target: jax.Array,
               size: int) -> jax.Array:
  """Units to swap: ``round(fraction * min(active, target))``, at most what the candidates allow."""
  n = jnp.round(jnp.clip(fraction, 0.0, 1.0) * jnp.minimum(active, target).astype(jnp.float32))
  return jnp.clip(n.astype(jnp.int32), 0, size - jnp.maximum(active, target))


def drop_and_grow(active: jax.Array, drop: jax.Array, grow: jax.Array, target: jax.Array,
                  fraction: jax.Array) -> jax.Array:
  """Moves `active` (bool units) to exactly `target` units, swapping a `fraction`.

  With ``k`` active units and ``n = swap_count(...)``, keeps the
  ``min(k, target) - n`` active units with the highest `drop` score and grows
  the ``n + max(target - k, 0)`` previously inactive units with the highest
  `grow` score. At a constant budget (``target == k``) this is the RigL/SET
  swap of ``n`` units; when the budget falls it also prunes, when it rises it
  also grows.
  """
  k = jnp.sum(active, dtype=jnp.int32)
  target = jnp.clip(jnp.asarray(target, jnp.int32), 0, active.size)
  n = swap_count(fraction, k, target, active.size)
  kept = topk.topk_mask(admissible(drop, active), jnp.minimum(k, target) - n)
  grown = topk.topk_mask(admissible(grow, ~active), n + jnp.maximum(target - k, 0))
  return kept | grown


def drop_and_grow_masks(masks, drop, grow, sparsity, distribution, fraction, step, paths,
                        granularity=None):
  """`drop_and_grow` on every leaf, with per-leaf targets from `distribution` at `sparsity`.

  Trees are restricted to the sparsified leaves and flattened: lists of
  masks, drop and grow scores in the order of `paths`. Targets come from the
  distribution's counts over the pooled drop scores of the active units (so a
  global distribution keeps the highest drop scores across leaves).
  """
  unit = granularities.as_granularity(granularity)
  active = [unit.pool(m, "max") for m in masks]
  drop_u = [admissible(unit.pool(d), a) for d, a in zip(drop, active)]
  grow_u = [unit.pool(g) for g in grow]
  targets = distribution.counts(paths, drop_u, sparsity, step, shapes=[m.shape for m in masks])
  return [unit.expand(drop_and_grow(a, d, g, t, fraction), m.shape)
          for m, a, d, g, t in zip(masks, active, drop_u, grow_u, targets)]


def topk_columns(scores: jax.Array, k: jax.Array) -> jax.Array:
  """Per column of `scores` [rows, cols], the `k[col]` largest, ties to the lower row.

  One sort per column finds the k-th key; the ties at it are taken in row
  order (no scatter, which is slow on CPU).
  """
  key = topk.keys(scores).reshape(scores.shape)
  rows = scores.shape[0]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (scores.shape[1],))
  descending = jnp.flip(jnp.sort(key, axis=0), axis=0)
  kth = jnp.take_along_axis(descending, jnp.clip(k - 1, 0, rows - 1)[None, :], axis=0)
  above, tied = key > kth, key == kth
  need = (k - jnp.sum(above, axis=0, dtype=jnp.int32))[None, :]
  ties = tied & (jnp.cumsum(tied, axis=0, dtype=jnp.int32) <= need)
  return (above | ties) & (k[None, :] > 0)
