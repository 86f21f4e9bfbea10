"""SpIEL: sparse fine-tuning that moves its support by dropping small and growing steep entries.

Reference: Scaling Sparse Fine-Tuning to Large Language Models. Ansell,
Vulić, Sterz, Korhonen, Ponti, 2024. arXiv:2401.16405.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src import schedules
from sparsejax._src import topk
from sparsejax._src.finetune import delta as delta_lib


def spiel(density: float, *, update_every: int, key: jax.Array, drop_fraction: Any = 0.3,
          begin_step: int = 0, end_step: int | None = None) -> delta_lib.Selector:
  """SpIEL: every `update_every` steps, swap the delta's smallest entries for the steepest.

  The support starts random. At each update a `drop_fraction` of the slots
  with the smallest ``|delta|`` leave, and as many inactive entries with the
  largest ``|gradient|`` (at that step) take their slots, starting at 0 with
  zero optimizer state; the count per leaf never changes and the dropped and
  grown sets are disjoint. (The paper's SpIEL-AG accumulates gradients of
  candidates over the steps before an update; this uses the step's own
  gradient, so nothing dense is kept between steps.)

  Args:
    density: share of each leaf's entries in its delta, in (0, 1].
    update_every: steps between support updates.
    key: for the random initial support.
    drop_fraction: share of the slots swapped per update (a float or a
      schedule of the step).
    begin_step, end_step: updates happen in ``[begin_step, end_step)``
      (end_step None: forever).

  Example:
    >>> tx = sj.finetune.sparse_delta(optax.adamw(1e-3), sj.finetune.spiel(
    ...     0.03, update_every=50, key=jax.random.key(0)))
  """
  density = _checks.density(density, "spiel")
  _checks.key(key)
  fraction = schedules.drop_fraction_schedule(drop_fraction, 0.3, begin_step, end_step)
  should_update = schedules.update_steps(update_every=update_every, begin_step=begin_step,
                                         end_step=end_step)

  def init(params, allowed):
    leaves, treedef = jax.tree.flatten(params, is_leaf=lambda x: x is None)
    allowed = jax.tree.leaves(allowed, is_leaf=lambda x: x is None)
    keys = jax.random.split(key, len(leaves))
    out = []
    for p, a, k in zip(leaves, allowed, keys):
      if p is None:
        out.append(None)
        continue
      scores = jax.random.uniform(k, (p.size,))
      out.append(delta_lib.top_indices(scores if a is None else jnp.where(a, scores, -1.0),
                                       delta_lib.budget(density, p.size)))
    return jax.tree.unflatten(treedef, out), None

  def update(deltas, grads, allowed, state, step):
    f = fraction(step)

    def move(d, g, a):
      k = d.indices.shape[0]
      grow_scores = jnp.abs(jnp.reshape(g, -1).astype(jnp.float32))
      inactive = jnp.ones(grow_scores.shape, bool).at[d.indices].set(False)
      if a is not None:
        inactive &= a
      n = jnp.minimum(jnp.round(f * k).astype(jnp.int32), jnp.sum(inactive))
      rank = jnp.argsort(jnp.argsort(jnp.abs(d.values), stable=True), stable=True)
      drop = rank < n  # the n smallest |delta|
      grow_mask = topk.topk_mask(jnp.where(inactive, grow_scores, -jnp.inf), n)
      grown = jnp.nonzero(grow_mask, size=k, fill_value=0)[0].astype(jnp.int32)
      return jnp.where(drop, grown[jnp.minimum(rank, k - 1)], d.indices)

    indices = jax.tree.map(lambda d, g, a: None if d is None else move(d, g, a), deltas, grads,
                           allowed, is_leaf=lambda x: x is None or isinstance(
                               x, delta_lib.SparseDelta))
    return indices, state

  return delta_lib.Selector(init, update, should_update)
