"""SRigL: RigL with a constant fan-in per neuron, and neuron ablation.

A sparsified leaf is read as ``(fan_in, neurons)``: its last axis indexes
output neurons and all other axes their inputs (a Dense kernel ``(in, out)``,
a conv kernel ``(h, w, in, out)``). Every living neuron has exactly the same
number of active inputs after every update, which is what makes the layer
fast as a condensed dense matmul.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import distributions
from sparsejax._src import dst
from sparsejax._src import pruning
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import sparsify
from sparsejax._src import topk


class SRigLState(NamedTuple):
  """Method state of `srigl`.

  Attributes:
    alive: per sparsified leaf, a bool per neuron: not ablated.
    budget: per sparsified leaf, its initial number of active weights (int32),
      shared by the living neurons.
  """

  alive: Any
  budget: Any


def _columns(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


def topk_columns(scores: jax.Array, k: jax.Array) -> jax.Array:
  """Per column of `scores` [rows, cols], the `k[col]` largest, ties to the lower row."""
  key = topk.keys(scores).reshape(scores.shape)
  order = jnp.argsort(~key, axis=0, stable=True)
  rank = jnp.zeros(scores.shape, jnp.int32).at[
      order, jnp.arange(scores.shape[1])[None, :]].set(
          jnp.broadcast_to(jnp.arange(scores.shape[0], dtype=jnp.int32)[:, None], scores.shape))
  return rank < jnp.broadcast_to(k, (scores.shape[1],))[None, :]


def _update_leaf(m, alive, budget, w, g, f, ablation_threshold):
  """One SRigL update of a leaf: per-neuron drop and grow, ablation, redistribution."""
  if m.size == 0:
    return m, alive
  m2 = _columns(m)
  w2 = _columns(jnp.abs(w).astype(jnp.float32))
  g2 = _columns(jnp.abs(g).astype(jnp.float32))
  rows, cols = m2.shape
  living = jnp.sum(alive, dtype=jnp.int32)
  k = jnp.sum(m2, dtype=jnp.int32) // jnp.maximum(living, 1)  # the constant fan-in
  # Salient weights: those unstructured RigL keeps or grows on the whole leaf.
  salient = dst.swap(m2.reshape(-1), ~m2.reshape(-1), w2.reshape(-1), g2.reshape(-1), f)
  salient = jnp.sum(salient.reshape(rows, cols), axis=0, dtype=jnp.int32)
  weak = alive & (salient.astype(jnp.float32) < ablation_threshold * k.astype(jnp.float32))
  # Ablate the weakest first, and only as many as leave room for the budget
  # (at least one neuron, and enough that budget / living fits in a column).
  keep_living = jnp.maximum((budget + rows - 1) // rows, 1)
  room = jnp.maximum(living - keep_living, 0)
  order = jnp.argsort(jnp.where(weak, salient, jnp.iinfo(jnp.int32).max), stable=True)
  rank = jnp.zeros(cols, jnp.int32).at[order].set(jnp.arange(cols, dtype=jnp.int32))
  alive = alive & ~(weak & (rank < room))
  new_k = jnp.minimum(budget // jnp.maximum(jnp.sum(alive, dtype=jnp.int32), 1), rows)
  # Per neuron: keep k - n inputs by magnitude, grow new_k - (k - n) by
  # gradient among inputs inactive before this update.
  n = jnp.round(jnp.clip(f, 0.0, 1.0) * k.astype(jnp.float32)).astype(jnp.int32)
  n = jnp.clip(n, 0, jnp.minimum(k, rows - new_k))
  kept = topk_columns(dst.admissible(w2, m2), k - n)
  grown = topk_columns(dst.admissible(g2, ~m2), new_k - (k - n))
  return ((kept | grown) & alive[None, :]).reshape(m.shape), alive


def srigl(
    sparsity: float,
    *,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    ablation_threshold: float = 0.3,
    key: jax.Array,
) -> sparsify.SparsityMethod:
  """Structured RigL with constant fan-in and neuron ablation.

  Each leaf's density (from `distribution`, "uniform" or "erk") sets a fan-in
  ``k = round(density * fan_in)`` that every neuron keeps. An update drops the
  ``round(drop_fraction * k)`` smallest-magnitude inputs of every neuron and
  grows as many where the dense gradient is largest, neuron by neuron. Then a
  neuron for which fewer than ``ablation_threshold * k`` of its weights are
  salient (kept or grown by unstructured RigL on the whole leaf with the same
  budget) is ablated: all its inputs are removed for good and the leaf's
  initial budget is shared by the living neurons, whose fan-in becomes
  ``floor(budget / living)``. The weakest go first, and never so many that
  the budget would not fit in the living neurons' columns.
  ``ablation_threshold=0`` turns ablation off.

  Reference: Dynamic Sparse Training with Structured Sparsity. Lasby, Golubeva,
  Evci, Nica, Ioannou, 2023. arXiv:2305.02299.

  Args:
    sparsity: target sparsity in [0, 1).
    end_step, begin_step, update_every, drop_fraction, key: as in `sj.rigl`.
    distribution: "uniform" or "erk" (a constant fan-in has no global form).
    ablation_threshold: share of the fan-in below which a neuron's salient
      weights get it ablated, in [0, 1].

  Example:
    >>> method = sj.srigl(0.9, end_step=7_500, key=jax.random.key(0))
  """
  schedules.check_fraction("sparsity", sparsity)
  schedules.check_fraction("ablation_threshold", ablation_threshold, closed=True)
  dst.check_steps(begin_step, end_step, update_every)
  fraction = dst.drop_fraction_schedule(drop_fraction, 0.3, begin_step, end_step)
  dist = distributions.as_distribution(distribution)
  if isinstance(dist, distributions.Global):
    raise ValueError("srigl needs a per-leaf density: use distribution='uniform' or 'erk'")
  scores.check_key(key)

  def fan_in_counts(params):
    leaves, _ = pytree.flatten(params)
    arrays = [a for _, a in leaves if a is not None]
    for path, a in leaves:
      if a is not None and a.ndim < 2:
        raise ValueError(f"srigl needs leaves with a fan-in and a neuron axis; "
                         f"{pytree.describe(path)} has shape {a.shape}")
    # The distribution's per-leaf count over a (fan_in, 1) column gives k.
    columns = [jnp.zeros((int(np.prod(a.shape[:-1])), 1)) for a in arrays]
    paths = [p for p, a in leaves if a is not None]
    return dist.counts(paths, columns, jnp.float32(sparsity), jnp.int32(0),
                       shapes=[a.shape for a in arrays])

  def init(params):
    counts = iter(fan_in_counts(params))
    random = scores.random(pruning.all_true(params), key)

    def leaf(w, r):
      k = next(counts)
      if w.size == 0:
        return jnp.zeros(w.shape, jnp.bool_)
      return topk_columns(_columns(r), k).reshape(w.shape)

    masks = jax.tree.map(leaf, params, random)
    alive = jax.tree.map(lambda w: jnp.ones(w.shape[-1], jnp.bool_), params)
    budget = jax.tree.map(lambda m: jnp.sum(m, dtype=jnp.int32), masks)
    return masks, SRigLState(alive, budget)

  def update(masks, state, params, grads, step):
    f = fraction(step)
    leaves, treedef = pytree.flatten(masks)
    flat = [pytree.flatten(t)[0] for t in (state.alive, state.budget, params, grads)]
    new_masks, new_alive = [], []
    for (_, m), (_, alive), (_, budget), (_, w), (_, g) in zip(leaves, *flat):
      if m is None:
        new_masks.append(None)
        new_alive.append(None)
        continue
      mask, alive = _update_leaf(m, alive, budget, w, g, f, ablation_threshold)
      new_masks.append(mask)
      new_alive.append(alive)
    unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflatten(new_masks), SRigLState(unflatten(new_alive), state.budget)

  return sparsify.SparsityMethod(init=init, update=update,
                                 should_update=dst.periodic_updates(begin_step, end_step,
                                                                    update_every))

