"""Dynamic sparse training: drop and grow connections, following a sparsity schedule.

Every method here is `drop_and_grow` with its own scores and defaults:

- `set_evolution` (SET): drop the smallest magnitudes, grow at random;
- `rigl` (RigL): drop the smallest magnitudes, grow the largest gradients;
- `granet` (GraNet): the same along Zhu & Gupta's cubic ramp, from dense (or
  `init_sparsity`) to `sparsity`.

At each mask update a leaf with ``k`` active units gets the budget
``target`` that the distribution gives it at ``sparsity(step)``; with
``n = round(drop_fraction(step) * min(k, target))`` it keeps the
``min(k, target) - n`` active units with the highest drop score and grows
the ``n + max(target - k, 0)`` units with the highest grow score among those
inactive before the update. Dropped and grown sets are disjoint, nothing
dropped is regrown in the same step, and the count after the update is
exactly ``target``.

Scores see the step's params and gradients. As in RigL's reference code, a
connection grown at a step is exactly zero after it, with zero optimizer
state, and its first update comes at the next step; a dropped one gets no
update at the step that drops it and lands on exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from sparsejax._src import _checks
from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import scores as scores_lib
from sparsejax._src import selection
from sparsejax._src import sparsify


class DropAndGrowState(NamedTuple):
  """Method state of `drop_and_grow` methods: the user's score state, or None."""

  score_state: Any


def drop_and_grow(
    sparsity: schedules.ScalarOrSchedule,
    *,
    drop_score: scores_lib.ScoreFn,
    grow_score: scores_lib.ScoreFn,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
    score_state: tuple[Callable, Callable] | None = None,
) -> sparsify.SparsityMethod:
  """Sparse-to-sparse training with pluggable drop and grow scores.

  Starts from a random mask at ``sparsity(0)`` (split by `distribution`) and,
  at every update step of `sj.update_steps`, moves each leaf to the budget of
  ``sparsity(step)`` while swapping ``round(drop_fraction(step) * k)`` units:
  the active ones with the lowest `drop_score` go, the previously inactive
  ones with the highest `grow_score` come in (see the module docstring).

  Args:
    sparsity: a float in [0, 1) or a schedule ``step -> sparsity``.
    drop_score: ``(params, grads, masks, ctx) -> scores``; higher keeps.
    grow_score: ``(params, grads, masks, ctx) -> scores``; higher grows.
    key: PRNG key for the initial mask and random scores; an update at step
      ``t`` uses ``fold_in(key, t)``.
    end_step: the last step at which masks may change.
    begin_step: no mask update before this step.
    update_every: steps between updates, >= 1.
    drop_fraction: share of active units swapped per update: a float in
      [0, 1] or a schedule; default a cosine decay from 0.3 at `begin_step`
      to 0 at `end_step`.
    distribution: how the budget is split over leaves: "erk" (default),
      "uniform", "global" or an instance.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.
    score_state: optional ``(init, update)`` for state the scores read
      through ``ctx.state``: ``init(masks) -> state`` and
      ``update(state, old_masks, new_masks, step) -> state`` after each update.

  Returns:
    a `SparsityMethod` for `sparsify`.

  Example:
    A RigL variant whose growth favours long-inactive connections::

      def explore(params, grads, masks, ctx):
        return jax.tree.map(lambda g, idle: jnp.abs(g) + 1e-3 * idle, grads, ctx.state)

      idle = (lambda masks: jax.tree.map(lambda m: jnp.zeros(m.shape), masks),
              lambda idle, old, new, step: jax.tree.map(
                  lambda i, m: jnp.where(m, 0.0, i + 1), idle, new))
      method = sj.drop_and_grow(0.9, drop_score=sj.magnitude_score, grow_score=explore,
                                score_state=idle, end_step=10_000, key=jax.random.key(0))
  """
  _checks.fraction("sparsity", sparsity)
  schedule = schedules.as_schedule(sparsity)
  _checks.steps(begin_step=begin_step, end_step=end_step, update_every=update_every)
  should_update = schedules.update_steps(update_every=update_every, begin_step=begin_step,
                                         end_step=end_step)
  fraction = schedules.drop_fraction_schedule(drop_fraction, 0.3, begin_step, end_step)
  dist = distributions.as_distribution(distribution)
  granularities.as_granularity(granularity)
  _checks.key(key)
  if not (callable(drop_score) and callable(grow_score)):
    raise ValueError("drop_score and grow_score must be callables (params, grads, masks, ctx)")
  if score_state is not None and not (
      isinstance(score_state, (tuple, list)) and len(score_state) == 2
      and all(callable(f) for f in score_state)):
    raise ValueError(f"score_state must be a pair of callables (init, update), got {score_state!r}")

  def init(params):
    masks = selection.random_masks(params, schedule(0), dist, key, granularity)
    return masks, DropAndGrowState(score_state[0](masks) if score_state else None)

  def update(masks, state, params, grads, step):
    ctx = scores_lib.UpdateContext(step, jax.random.fold_in(key, step), state.score_state)
    leaves, treedef = pytree.flatten(masks)
    sparsified = [i for i, (_, m) in enumerate(leaves) if m is not None]

    def flat(tree):
      tree_leaves = pytree.flatten(tree)[0]
      return [tree_leaves[i][1] for i in sparsified]

    new = selection.drop_and_grow_masks(
        flat(masks), flat(drop_score(params, grads, masks, ctx)),
        flat(grow_score(params, grads, masks, ctx)), schedule(step), dist, fraction(step), step,
        [leaves[i][0] for i in sparsified], granularity)
    out = [None] * len(leaves)
    for i, m in zip(sparsified, new):
      out[i] = m
    new_masks = jax.tree_util.tree_unflatten(treedef, out)
    new_state = score_state[1](state.score_state, masks, new_masks, step) if score_state else None
    return new_masks, DropAndGrowState(new_state)

  return sparsify.SparsityMethod(init=init, update=update, should_update=should_update)


def set_evolution(
    sparsity: schedules.ScalarOrSchedule,
    *,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """SET: drop the smallest-magnitude active weights, regrow as many at random.

  Reference: Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science. Mocanu, Mocanu, Stone,
  Nguyen, Gibescu, Liotta, 2018. arXiv:1707.04780.

  Args are those of `drop_and_grow`.

  Example:
    >>> method = sj.set_evolution(0.9, end_step=10_000, key=jax.random.key(0))
  """
  return drop_and_grow(sparsity, drop_score=scores_lib.magnitude_score,
                       grow_score=scores_lib.random_score, key=key, end_step=end_step,
                       begin_step=begin_step, update_every=update_every,
                       drop_fraction=drop_fraction, distribution=distribution,
                       granularity=granularity)


def rigl(
    sparsity: schedules.ScalarOrSchedule,
    *,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """RigL: drop the smallest magnitudes, grow where the dense gradient is largest.

  The gradient is the one `sparsify` receives: the gradient with respect to
  the full (masked) weight matrix, nonzero at inactive entries too. The
  default drop fraction decays from 0.3 to 0 at `end_step` with a cosine, as in
  the paper.

  Reference: Rigging the Lottery: Making All Tickets Winners. Evci, Gale,
  Menick, Castro, Elsen, 2020. arXiv:1911.11134.

  Args are those of `drop_and_grow`.

  Example:
    >>> method = sj.rigl(0.9, end_step=7_500, update_every=100, key=jax.random.key(0))
    >>> tx = sj.sparsify(optax.sgd(0.1, momentum=0.9), method)
  """
  return drop_and_grow(sparsity, drop_score=scores_lib.magnitude_score,
                       grow_score=scores_lib.gradient_score, key=key, end_step=end_step,
                       begin_step=begin_step, update_every=update_every,
                       drop_fraction=drop_fraction, distribution=distribution,
                       granularity=granularity)


def granet(
    sparsity: schedules.ScalarOrSchedule,
    *,
    key: jax.Array,
    end_step: int,
    init_sparsity: float = 0.0,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
) -> sparsify.SparsityMethod:
  """GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

  RigL's drop and grow along Zhu & Gupta's cubic ramp: sparsity goes from
  `init_sparsity` at `begin_step` to `sparsity` at `end_step`
  (``sj.cubic_schedule``). At each update the leaf is pruned by magnitude to
  the schedule's budget and ``round(drop_fraction * k)`` more of its smallest
  weights are swapped for as many grown where the dense gradient is largest,
  so regeneration costs no budget. ``init_sparsity=0`` is dense-to-sparse;
  above 0 the run starts from a random mask (sparse-to-sparse). A schedule
  given as `sparsity` replaces the ramp (leave `init_sparsity` at 0 then).

  Reference: Sparse Training via Boosting Pruning Plasticity with
  Neuroregeneration. Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy,
  Wang, Mocanu, 2021. arXiv:2106.10404.

  Args:
    sparsity: final sparsity in [0, 1), or a schedule.
    key, end_step, begin_step, update_every, distribution, granularity: as in
      `drop_and_grow`.
    init_sparsity: sparsity before `begin_step`, in [0, 1), <= `sparsity`.
    drop_fraction: regenerated share per update; default a cosine decay
      from 0.5 to 0 at `end_step`.

  Example:
    >>> method = sj.granet(0.9, init_sparsity=0.5, end_step=5_000, key=jax.random.key(0))
  """
  if callable(sparsity):
    if init_sparsity != 0.0:
      raise ValueError("granet: give either a sparsity schedule or init_sparsity with a final "
                       f"sparsity, not both (got a schedule and {init_sparsity=})")
    schedule = sparsity
  else:
    _checks.fraction("sparsity", sparsity)
    _checks.fraction("init_sparsity", init_sparsity, schedule=False)
    if _checks.is_concrete(sparsity) and _checks.is_concrete(init_sparsity) and (
        float(init_sparsity) > float(sparsity)):
      raise ValueError(f"{init_sparsity=} must be <= {sparsity=}: GraNet only prunes")
    _checks.steps(begin_step=begin_step, end_step=end_step, update_every=update_every)
    schedule = schedules.cubic_schedule(sparsity, init_sparsity=init_sparsity,
                                        begin_step=begin_step, end_step=end_step)
  return drop_and_grow(schedule, drop_score=scores_lib.magnitude_score,
                       grow_score=scores_lib.gradient_score, key=key, end_step=end_step,
                       begin_step=begin_step, update_every=update_every,
                       drop_fraction=schedules.drop_fraction_schedule(
                           drop_fraction, 0.5, begin_step, end_step),
                       distribution=distribution, granularity=granularity)
