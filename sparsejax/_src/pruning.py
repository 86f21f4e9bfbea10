"""Pruning methods: a fixed random mask, magnitude pruning and SNIP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import sparsify

def all_true(params):
  """All-True masks for (restricted) params."""
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def random_masks(params, sparsity, dist, key, granularity=None):
  """Masks keeping a uniformly random `1 - sparsity` of each leaf's share (`dist`)."""
  return distributions.topk_masks(scores.random(all_true(params), key), sparsity, dist,
                                  granularity=granularity)


def static_random(
    sparsity: schedules.ScalarOrSchedule,
    distribution: distributions.DistributionLike = "uniform",
    *,
    key: jax.Array,
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """A random mask drawn at init and kept fixed.

  Args:
    sparsity: sparsity in [0, 1) (a schedule is read at step 0).
    distribution: "uniform", "erk", "global" or a distribution instance.
    key: PRNG key; the same key gives the same mask.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> tx = sj.sparsify(optax.adam(1e-3), sj.static_random(0.9, "erk", key=jax.random.key(0)))
  """
  schedules.check_fraction("sparsity", sparsity)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)
  scores.check_key(key)

  def init(params):
    return random_masks(params, sparsity, dist, key, granularity), None

  return sparsify.SparsityMethod(
      init=init,
      update=lambda masks, state, params, grads, step: (masks, state),
      should_update=lambda step: jnp.zeros([], jnp.bool_))


def magnitude(
    sparsity: schedules.ScalarOrSchedule,
    update_every: int = 100,
    distribution: distributions.DistributionLike = "uniform",
    *,
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """Magnitude pruning: keep the largest ``|w|``, one-shot or gradual.

  The masks are computed from the params at init (``sparsity(0)``) and again
  every `update_every` steps with ``sparsity(step)``. Pruned entries are never
  regrown while the schedule does not decrease. With a
  `polynomial_schedule` this is the gradual pruning of Zhu & Gupta; with
  ``distribution="global"`` it is global magnitude pruning.

  Reference: To prune, or not to prune: exploring the efficacy of pruning for
  model compression. Zhu & Gupta, 2017. arXiv:1710.01878.

  Args:
    sparsity: a float in [0, 1) or a schedule ``step -> sparsity``.
    update_every: steps between mask updates, >= 1.
    distribution: "uniform", "erk", "global" or a distribution instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`: whole
      tiles or channels pruned by their mean (or max) magnitude.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> schedule = sj.polynomial_schedule(0.0, 0.9, begin_step=100, end_step=1000)
    >>> tx = sj.sparsify(optax.adam(1e-3), sj.magnitude(schedule, update_every=100))
  """
  schedules.check_fraction("sparsity", sparsity)
  schedules.check_positive_int("update_every", update_every)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)

  def init(params):
    masks = all_true(params)
    return distributions.topk_masks(scores.magnitude(params, masks), sparsity, dist,
                                    granularity=granularity), None

  def update(masks, state, params, grads, step):
    del grads
    return distributions.topk_masks(scores.magnitude(params, masks), sparsity, dist, step=step,
                                    granularity=granularity), state

  return sparsify.SparsityMethod(
      init=init,
      update=update,
      should_update=lambda step: (step > 0) & (step % update_every == 0))


def snip(
    sparsity: schedules.ScalarOrSchedule,
    distribution: distributions.DistributionLike = "global",
    *,
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """SNIP: one-shot pruning by connection sensitivity ``|w * g|``.

  The mask is computed once, from the params and the gradient of the first
  `update` call (step 0), and applied by that same update. Ranking is global
  across leaves by default, as in the paper.

  Reference: SNIP: Single-shot Network Pruning based on Connection
  Sensitivity. Lee, Ajanthan, Torr, 2019. arXiv:1810.02340.

  Args:
    sparsity: a float in [0, 1) (a schedule is read at step 0).
    distribution: "global" (default), "uniform", "erk" or an instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    >>> tx = sj.sparsify(optax.sgd(0.1, momentum=0.9), sj.snip(0.95))
  """
  schedules.check_fraction("sparsity", sparsity)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)

  def update(masks, state, params, grads, step):
    return distributions.topk_masks(scores.saliency(params, grads, masks), sparsity, dist,
                                    step=step, granularity=granularity), state

  return sparsify.SparsityMethod(
      init=lambda params: (all_true(params), None),
      update=update,
      should_update=lambda step: step == 0)
