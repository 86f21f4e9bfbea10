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

from sparsejax._src import _checks
from sparsejax._src import distributions
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import selection
from sparsejax._src import sparsify


class SRigLState(NamedTuple):
  """Method state of `srigl`.

  Attributes:
    alive: per sparsified leaf, a bool per neuron: not ablated.
  """

  alive: Any


def _columns(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


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
  flat = m2.reshape(-1)
  salient = selection.drop_and_grow(flat, w2.reshape(-1), g2.reshape(-1),
                                    jnp.sum(flat, dtype=jnp.int32), f)
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
  # Per neuron: keep min(k, new_k) - n inputs by magnitude, grow the rest of
  # new_k by gradient among inputs inactive before this update.
  n = selection.swap_count(f, k, new_k, rows)
  kept_k = jnp.minimum(k, new_k) - n
  kept = selection.topk_columns(selection.admissible(w2, m2), kept_k)
  grown = selection.topk_columns(selection.admissible(g2, ~m2), new_k - kept_k)
  return ((kept | grown) & alive[None, :]).reshape(m.shape), alive


def srigl(
    sparsity: schedules.ScalarOrSchedule,
    *,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: None = None,
    ablation_threshold: float = 0.3,
) -> sparsify.SparsityMethod:
  """Structured RigL with constant fan-in and neuron ablation.

  Each leaf's density at ``sparsity(step)`` (from `distribution`, "erk" or
  "uniform") sets a fan-in ``k = round(density * fan_in)`` and a budget of
  ``k * neurons``. An update drops the ``round(drop_fraction * k)``
  smallest-magnitude inputs of every neuron and grows as many where the dense
  gradient is largest, neuron by neuron (more or fewer when a schedule moves
  the budget). Then a neuron for which fewer than ``ablation_threshold * k``
  of its weights are salient (kept or grown by unstructured RigL on the whole
  leaf with the same budget) is ablated: all its inputs are removed for good
  and the budget is shared by the living neurons, whose fan-in becomes
  ``floor(budget / living)``. The weakest go first, and never so many that
  the budget would not fit in the living neurons' columns.
  ``ablation_threshold=0`` turns ablation off.

  Reference: Dynamic Sparse Training with Structured Sparsity. Lasby, Golubeva,
  Evci, Nica, Ioannou, 2023. arXiv:2305.02299.

  Args:
    sparsity: a float in [0, 1) or a schedule ``step -> sparsity``.
    key, end_step, begin_step, update_every, drop_fraction: as in `sj.rigl`.
    distribution: "erk" (default) or "uniform" (a constant fan-in has no
      global form).
    granularity: None only: the unit of SRigL is already structured (a
      neuron's fan-in), so blocks and channels do not apply.
    ablation_threshold: share of the fan-in below which a neuron's salient
      weights get it ablated, in [0, 1].

  Example:
    >>> method = sj.srigl(0.9, end_step=7_500, key=jax.random.key(0))
  """
  _checks.fraction("sparsity", sparsity)
  schedule = schedules.as_schedule(sparsity)
  _checks.fraction("ablation_threshold", ablation_threshold, closed=True, schedule=False)
  _checks.steps(begin_step=begin_step, end_step=end_step, update_every=update_every)
  should_update = schedules.update_steps(update_every=update_every, begin_step=begin_step,
                                         end_step=end_step)
  fraction = schedules.drop_fraction_schedule(drop_fraction, 0.3, begin_step, end_step)
  dist = distributions.as_distribution(distribution)
  if isinstance(dist, distributions.Global):
    raise ValueError("srigl needs a per-leaf density: use distribution='erk' or 'uniform'")
  if granularity is not None:
    raise ValueError(f"srigl: granularity={granularity!r} is not supported: SRigL's unit is "
                     "already structured (a constant fan-in per neuron); use granularity=None, "
                     "or sj.rigl with granularity=sj.Block(...) or sj.Channel(...)")
  _checks.key(key)

  def fan_in(params, step):
    """Per sparsified leaf (flat order), the constant fan-in k at `step`."""
    leaves = [(p, a) for p, a in pytree.flatten(params)[0] if a is not None]
    for path, a in leaves:
      if a.ndim < 2:
        raise ValueError(f"srigl needs leaves with a fan-in and a neuron axis; "
                         f"{pytree.describe(path)} has shape {a.shape}")
    # The distribution's per-leaf count over a (fan_in, 1) column gives k.
    columns = [jnp.zeros((int(np.prod(a.shape[:-1])), 1)) for _, a in leaves]
    return dist.counts([p for p, _ in leaves], columns, schedule(step), step,
                       shapes=[a.shape for _, a in leaves])

  def init(params):
    counts = iter(fan_in(params, 0))
    random = scores.random_scores(params, key)

    def leaf(w, r):
      k = next(counts)
      if w.size == 0:
        return jnp.zeros(w.shape, jnp.bool_)
      return selection.topk_columns(_columns(r), k).reshape(w.shape)

    masks = jax.tree.map(leaf, params, random)
    return masks, SRigLState(jax.tree.map(lambda w: jnp.ones(w.shape[-1], jnp.bool_), params))

  def update(masks, state, params, grads, step):
    f = fraction(step)
    leaves, treedef = pytree.flatten(masks)
    counts = iter(fan_in(params, step))
    flat = [pytree.flatten(t)[0] for t in (state.alive, params, grads)]
    new_masks, new_alive = [], []
    for (_, m), (_, alive), (_, w), (_, g) in zip(leaves, *flat):
      if m is None:
        new_masks.append(None)
        new_alive.append(None)
        continue
      mask, alive = _update_leaf(m, alive, next(counts) * m.shape[-1], w, g, f,
                                 ablation_threshold)
      new_masks.append(mask)
      new_alive.append(alive)
    unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflatten(new_masks), SRigLState(unflatten(new_alive))

  return sparsify.SparsityMethod(init=init, update=update, should_update=should_update)
