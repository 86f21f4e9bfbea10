"""Pruning methods: a fixed random mask, magnitude pruning, SNIP and a given mask held fixed."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import selection
from sparsejax._src import sparsify


def _never(step):
  del step
  return jnp.zeros([], jnp.bool_)


def static_random(
    sparsity: float,
    *,
    key: jax.Array,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """A random mask drawn at init and kept fixed.

  Args:
    sparsity: a float in [0, 1) (a fixed mask cannot follow a schedule).
    key: PRNG key; the same key gives the same mask.
    distribution: "erk" (default), "uniform", "global" or a distribution instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> tx = sj.sparsify(optax.adam(1e-3), sj.static_random(0.9, key=jax.random.key(0)))
  """
  schedules.constant(sparsity, "sparsity", "static_random")
  _checks.key(key)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)

  def init(params):
    return selection.random_masks(params, sparsity, dist, key, granularity), None

  return sparsify.SparsityMethod(
      init=init, update=lambda masks, state, params, grads, step: (masks, state),
      should_update=_never)


def magnitude(
    sparsity: schedules.ScalarOrSchedule,
    *,
    update_every: int = 100,
    begin_step: int = 0,
    end_step: int | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """Magnitude pruning: keep the largest ``|w|``, one-shot or gradual.

  The masks are computed from the params at init (``sparsity(0)``) and again
  at every update step of `sj.update_steps` with ``sparsity(step)``. Pruned
  entries are never regrown while the schedule does not decrease. With
  `cubic_schedule` this is the gradual pruning of Zhu & Gupta; with
  ``distribution="global"`` it is global magnitude pruning.

  Reference: To prune, or not to prune: exploring the efficacy of pruning for
  model compression. Zhu & Gupta, 2017. arXiv:1710.01878.

  Args:
    sparsity: a float in [0, 1) or a schedule ``step -> sparsity``.
    update_every: steps between mask updates, >= 1.
    begin_step: no mask update before this step.
    end_step: no mask update after this step (None: no end).
    distribution: "erk" (default), "uniform", "global" or a distribution instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`: whole
      tiles or channels pruned by their mean (or max) magnitude.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> schedule = sj.cubic_schedule(0.9, begin_step=100, end_step=1000)
    >>> tx = sj.sparsify(optax.adam(1e-3), sj.magnitude(schedule, update_every=100))
  """
  _checks.fraction("sparsity", sparsity)
  should_update = schedules.update_steps(update_every=update_every, begin_step=begin_step,
                                         end_step=end_step)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)

  def select(params, masks, step):
    score = jax.tree.map(selection.admissible, scores.magnitude_score(params, None, None, None),
                         masks)
    return distributions.masks_from_scores(score, sparsity, distribution=dist, step=step,
                                           granularity=granularity)

  def init(params):
    return select(params, selection.all_true(params), 0), None

  def update(masks, state, params, grads, step):
    del grads
    return select(params, masks, step), state

  return sparsify.SparsityMethod(init=init, update=update, should_update=should_update)


class SnipState(NamedTuple):
  """Method state of `snip`.

  Attributes:
    pending: True until the mask is committed (at the first finite step).
  """

  pending: jax.Array


def snip(
    sparsity: float,
    *,
    distribution: distributions.DistributionLike = "global",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """SNIP: one-shot pruning by connection sensitivity ``|w * g|``.

  The mask is computed once, at the first `update` whose gradients and
  params are all finite (an fp16 loss-scale overflow, for instance, only
  delays it), from that step's params and gradient, and kept fixed after:
  pruned weights land on zero at that step. Until then training is dense. Ranking is
  global across leaves by default, as in the paper (every other method
  defaults to "erk").

  Reference: SNIP: Single-shot Network Pruning based on Connection
  Sensitivity. Lee, Ajanthan, Torr, 2019. arXiv:1810.02340.

  Args:
    sparsity: a float in [0, 1) (a one-shot mask cannot follow a schedule).
    distribution: "global" (default), "erk", "uniform" or an instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> tx = sj.sparsify(optax.sgd(0.1, momentum=0.9), sj.snip(0.95))
  """
  schedules.constant(sparsity, "sparsity", "snip")
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)

  def update(masks, state, params, grads, step):
    def attempt():
      finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, grads))])

      def commit():
        score = scores.saliency_score(params, grads, masks, None)
        return distributions.masks_from_scores(score, sparsity, distribution=dist, step=step,
                                               granularity=granularity)

      done = jnp.all(finite)
      return lax.cond(done, commit, lambda: masks), SnipState(~done)

    return lax.cond(state.pending, attempt, lambda: (masks, state))

  # The update runs at every step but selects only once: its own flag decides.
  return sparsify.SparsityMethod(
      init=lambda params: (selection.all_true(params), SnipState(jnp.ones([], jnp.bool_))),
      update=update, should_update=lambda step: jnp.ones([], jnp.bool_))



def fixed(masks) -> sparsify.SparsityMethod:
  """Holds a given mask: the masks of post-training pruning, or of any earlier run.

  The params are pruned to `masks` at the first update and stay exactly zero
  there; the other entries train. A leaf that `sparsify`'s ``where`` selects
  but `masks` leaves None (or a dense leaf of `masks`) trains dense.

  Args:
    masks: a masks pytree paired with the params: bool arrays at pruned
      leaves, None at dense ones (what `sj.prune` and `sj.get_masks` return).

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> masks, params = sj.prune.sparsegpt(model, calibration, sparsity=0.5)
    >>> tx = sj.sparsify(optax.adamw(1e-4), sj.fixed(masks))
  """
  leaves, _ = pytree.flatten(masks)
  if not any(m is not None for _, m in leaves):
    raise ValueError("fixed: masks has no bool array: nothing would be pruned")
  given = {}
  for path, m in leaves:
    if m is None:
      continue
    m = pytree.unwrap(m)
    if not isinstance(m, (jax.Array, np.ndarray)) or jnp.result_type(m) != jnp.bool_:
      raise ValueError(f"fixed: {pytree.describe(path, 'masks')} must be a bool array, got "
                       f"{getattr(m, 'dtype', type(m).__name__)}")
    given[pytree.path_str(path)] = (path, jnp.asarray(m))

  def init(params):
    p_leaves, treedef = pytree.flatten(params)
    paths = {pytree.path_str(p) for p, _ in p_leaves}
    out = []
    for path, p in p_leaves:
      name = pytree.path_str(path)
      if p is None:
        if name in given:
          raise ValueError(
              f"fixed: {pytree.describe(path, 'masks')} is a mask, but sparsify's `where` "
              "leaves that leaf dense; pass where= a filter that selects it")
        out.append(None)
        continue
      if name not in given:
        out.append(jnp.ones(jnp.shape(p), jnp.bool_))
        continue
      mask = given[name][1]
      if mask.shape != jnp.shape(p):
        raise ValueError(f"fixed: {pytree.describe(path, 'masks')} has shape {mask.shape}, the "
                         f"param has shape {jnp.shape(p)}")
      out.append(mask)
    unknown = sorted(set(given) - paths)
    if unknown:
      raise ValueError(f"fixed: masks has leaves that params has not: {unknown[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out), None

  return sparsify.SparsityMethod(
      init=init, update=lambda masks, state, params, grads, step: (masks, state),
      should_update=_never)
