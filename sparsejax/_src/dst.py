"""Dynamic sparse training: drop and grow connections under a fixed budget.

Every method here is `drop_and_grow` with its own scores:

- `set_evolution` (SET): drop the smallest magnitudes, grow at random;
- `rigl` (RigL): drop the smallest magnitudes, grow the largest gradients;
- `granet` (GraNet): gradual magnitude pruning plus the same drop and grow.

At each mask update a leaf with ``k`` active units drops the
``n = round(drop_fraction(step) * k)`` active units with the lowest drop score
and grows the ``n`` units with the highest grow score among those that were
inactive before the update, so the budget is unchanged, dropped and grown sets
are disjoint and nothing dropped is regrown in the same step. Grown weights
start at exactly zero (inactive weights are zero) with zeroed optimizer state
(`sparsify` keeps the state of inactive entries at zero).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import pruning
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import sparsify
from sparsejax._src import topk

PyTree = Any


class UpdateContext(NamedTuple):
  """What a score function sees besides params, grads and masks.

  Attributes:
    step: the step of this mask update.
    key: a PRNG key for this update, ``fold_in(key, step)``.
    state: the score state, if the method was given ``score_state``.
  """

  step: jax.Array
  key: jax.Array
  state: Any


class DropAndGrowState(NamedTuple):
  """Method state of `drop_and_grow` methods: the user's score state, or None."""

  score_state: Any


ScoreFn = Callable[[PyTree, PyTree, PyTree, UpdateContext], PyTree]


def magnitude_score(params, grads, masks, ctx):
  """``|w|``: drop the smallest weights."""
  del grads, masks, ctx
  return jax.tree.map(lambda w: jnp.abs(w).astype(jnp.float32), params)


def gradient_score(params, grads, masks, ctx):
  """``|g|`` of the dense gradient: grow where the loss would move most (RigL)."""
  del params, masks, ctx
  return jax.tree.map(lambda g: jnp.abs(g).astype(jnp.float32), grads)


def random_score(params, grads, masks, ctx):
  """Uniform random scores from the update's key: grow at random (SET)."""
  del params, grads
  return scores.random(masks, ctx.key)


def cosine_fraction(initial: float, begin_step: int, end_step: int) -> schedules.Schedule:
  """``initial * (1 + cos(pi * progress)) / 2`` from `begin_step` to 0 at `end_step`."""
  span = max(end_step - begin_step, 1)

  def schedule(step):
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / span, 0.0, 1.0)
    return initial * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  return schedule


def admissible(score: jax.Array, allowed: jax.Array) -> jax.Array:
  """Scores of allowed units, finite or +inf; -inf for the rest."""
  lowest = jnp.finfo(jnp.float32).min
  s = score.astype(jnp.float32)
  s = jnp.where(jnp.isnan(s), lowest, jnp.maximum(s, lowest))
  return jnp.where(allowed, s, -jnp.inf)


def swap(active: jax.Array, candidates: jax.Array, drop: jax.Array, grow: jax.Array,
         fraction: jax.Array) -> jax.Array:
  """Drops ``round(fraction * k)`` of the `k` active units and grows as many candidates.

  Args:
    active: bool units that are on.
    candidates: bool units that may be grown (active ones never are).
    drop: scores; the active units with the lowest are dropped.
    grow: scores; the candidates with the highest are grown.
    fraction: share of active units to swap (clipped to what the candidates allow).

  Returns:
    the new bool units, with exactly as many on as `active`.
  """
  candidates = candidates & ~active
  k = jnp.sum(active, dtype=jnp.int32)
  n = jnp.round(jnp.clip(fraction, 0.0, 1.0) * k.astype(jnp.float32)).astype(jnp.int32)
  n = jnp.minimum(n, jnp.sum(candidates, dtype=jnp.int32))
  kept = topk.topk_mask(admissible(drop, active), k - n)
  grown = topk.topk_mask(admissible(grow, candidates), n)
  return kept | grown


def check_steps(begin_step, end_step, update_every):
  schedules.check_positive_int("update_every", update_every)
  schedules.check_positive_int("begin_step", begin_step, minimum=0)
  schedules.check_positive_int("end_step", end_step, minimum=0)
  if end_step < begin_step:
    raise ValueError(f"{end_step=} must be >= {begin_step=}")


def periodic_updates(begin_step, end_step, update_every):
  """`should_update` of the drop-and-grow family: every `update_every` steps in [begin, end)."""
  return lambda step: ((step > 0) & (step >= begin_step) & (step < end_step)
                       & (step % update_every == 0))


def drop_fraction_schedule(drop_fraction, default, begin_step, end_step):
  if drop_fraction is None:
    return cosine_fraction(default, begin_step, end_step)
  if not callable(drop_fraction):
    schedules.check_fraction("drop_fraction", drop_fraction, closed=True)
    return lambda step: jnp.asarray(drop_fraction, jnp.float32)
  return drop_fraction


def drop_and_grow(
    sparsity: float,
    *,
    drop_score: ScoreFn,
    grow_score: ScoreFn,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "uniform",
    granularity: granularities.Granularity = None,
    key: jax.Array,
    score_state: tuple[Callable, Callable] | None = None,
) -> sparsify.SparsityMethod:
  """Sparse-to-sparse training with pluggable drop and grow scores.

  Starts from a random mask at `sparsity` (split by `distribution`) and, every
  `update_every` steps in ``[begin_step, end_step)``, swaps
  ``round(drop_fraction(step) * k)`` units of each leaf: the active ones with
  the lowest `drop_score` go, the previously inactive ones with the highest
  `grow_score` come in. The number of active units per leaf never changes.

  Args:
    sparsity: fixed sparsity in [0, 1).
    drop_score: ``(params, grads, masks, ctx) -> scores``; higher keeps.
    grow_score: ``(params, grads, masks, ctx) -> scores``; higher grows.
    end_step: no updates from this step on.
    begin_step: no updates before this step.
    update_every: steps between updates, >= 1.
    drop_fraction: share of active units swapped per update: a float in
      [0, 1] or a schedule; default a cosine decay from 0.3 to 0 at `end_step`.
    distribution: how the budget is split over leaves at init.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.
    key: PRNG key for the initial mask and random scores; an update at step
      ``t`` uses ``fold_in(key, t)``.
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
  schedules.check_fraction("sparsity", sparsity)
  check_steps(begin_step, end_step, update_every)
  fraction = drop_fraction_schedule(drop_fraction, 0.3, begin_step, end_step)
  dist = distributions.as_distribution(distribution)
  unit = granularities.as_granularity(granularity)
  scores.check_key(key)
  if not (callable(drop_score) and callable(grow_score)):
    raise ValueError("drop_score and grow_score must be callables (params, grads, masks, ctx)")
  if score_state is not None and not (
      isinstance(score_state, (tuple, list)) and len(score_state) == 2
      and all(callable(f) for f in score_state)):
    raise ValueError(f"score_state must be a pair of callables (init, update), got {score_state!r}")

  def init(params):
    masks = pruning.random_masks(params, sparsity, dist, key, granularity)
    state = score_state[0](masks) if score_state else None
    return masks, DropAndGrowState(state)

  def update(masks, state, params, grads, step):
    ctx = UpdateContext(step, jax.random.fold_in(key, step), state.score_state)
    drop, grow = drop_score(params, grads, masks, ctx), grow_score(params, grads, masks, ctx)
    f = fraction(step)

    def leaf(m, d, g):
      m_u = unit.pool(m, "max")
      return unit.expand(swap(m_u, ~m_u, unit.pool(d), unit.pool(g), f), m.shape)

    new = jax.tree.map(leaf, masks, drop, grow)
    new_state = score_state[1](state.score_state, masks, new, step) if score_state else None
    return new, DropAndGrowState(new_state)

  return sparsify.SparsityMethod(init=init, update=update,
                                 should_update=periodic_updates(begin_step, end_step,
                                                                update_every))


def set_evolution(
    sparsity: float,
    *,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
    key: jax.Array,
) -> sparsify.SparsityMethod:
  """SET: drop the smallest-magnitude active weights, regrow as many at random.

  Reference: Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science. Mocanu, Mocanu, Stone,
  Nguyen, Gibescu, Liotta, 2018. arXiv:1707.04780.

  Args are those of `drop_and_grow` (default distribution ERK).

  Example:
    >>> method = sj.set_evolution(0.9, end_step=10_000, key=jax.random.key(0))
  """
  return drop_and_grow(
      sparsity, drop_score=magnitude_score, grow_score=random_score, end_step=end_step,
      begin_step=begin_step, update_every=update_every, drop_fraction=drop_fraction,
      distribution=distribution, granularity=granularity, key=key)


def rigl(
    sparsity: float,
    *,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
    key: jax.Array,
) -> sparsify.SparsityMethod:
  """RigL: drop the smallest magnitudes, grow where the dense gradient is largest.

  The gradient is the one `sparsify` receives: the gradient with respect to
  the full (masked) weight matrix, nonzero at inactive entries too. The
  default drop fraction decays from 0.3 to 0 at `end_step` with a cosine, as in
  the paper.

  Reference: Rigging the Lottery: Making All Tickets Winners. Evci, Gale,
  Menick, Castro, Elsen, 2020. arXiv:1911.11134.

  Args are those of `drop_and_grow` (default distribution ERK).

  Example:
    >>> method = sj.rigl(0.9, end_step=7_500, update_every=100, key=jax.random.key(0))
    >>> tx = sj.sparsify(optax.sgd(0.1, momentum=0.9), method)
  """
  return drop_and_grow(
      sparsity, drop_score=magnitude_score, grow_score=gradient_score, end_step=end_step,
      begin_step=begin_step, update_every=update_every, drop_fraction=drop_fraction,
      distribution=distribution, granularity=granularity, key=key)


def granet(
    sparsity: float,
    *,
    end_step: int,
    init_sparsity: float = 0.0,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float | schedules.Schedule | None = None,
    distribution: distributions.DistributionLike = "erk",
    granularity: granularities.Granularity = None,
    key: jax.Array,
) -> sparsify.SparsityMethod:
  """GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

  Sparsity follows Zhu & Gupta's cubic schedule from `init_sparsity` at
  `begin_step` to `sparsity` at `end_step`. Every `update_every` steps in
  ``[begin_step, end_step]``, and at `end_step`, the leaf is first pruned by magnitude to the
  schedule's sparsity, then ``round(drop_fraction * k)`` more of its smallest
  weights are dropped and as many are grown where the dense gradient is
  largest (among weights inactive before the update), so regeneration costs
  no budget. ``init_sparsity=0`` is dense-to-sparse; above 0 the run starts
  from a random mask (sparse-to-sparse).

  Reference: Sparse Training via Boosting Pruning Plasticity with
  Neuroregeneration. Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy,
  Wang, Mocanu, 2021. arXiv:2106.10404.

  Args:
    sparsity: final sparsity in [0, 1).
    end_step: the step the final sparsity is reached; no updates after it.
    init_sparsity: sparsity before `begin_step`, in [0, 1).
    begin_step, update_every, distribution, granularity, key: as in
      `drop_and_grow`.
    drop_fraction: regenerated share per update; default a cosine decay
      from 0.5 to 0 at `end_step`.

  Example:
    >>> method = sj.granet(0.9, init_sparsity=0.5, end_step=5_000, key=jax.random.key(0))
  """
  schedules.check_fraction("sparsity", sparsity)
  schedules.check_fraction("init_sparsity", init_sparsity)
  if schedules.is_concrete(sparsity) and schedules.is_concrete(init_sparsity) and (
      float(init_sparsity) > float(sparsity)):
    raise ValueError(f"{init_sparsity=} must be <= {sparsity=}: GraNet only prunes")
  check_steps(begin_step, end_step, update_every)
  schedule = schedules.polynomial_schedule(init_sparsity, sparsity, begin_step, end_step)
  fraction = drop_fraction_schedule(drop_fraction, 0.5, begin_step, end_step)
  dist = distributions.as_distribution(distribution)
  unit = granularities.as_granularity(granularity)
  scores.check_key(key)

  def init(params):
    return pruning.random_masks(params, init_sparsity, dist, key, granularity), None

  def update(masks, state, params, grads, step):
    pruned = distributions.topk_masks(scores.magnitude(params, masks), schedule, dist,
                                      step=step, granularity=granularity)
    f = fraction(step)

    def leaf(old, active, w, g):
      old_u, active_u = unit.pool(old, "max"), unit.pool(active, "max")
      new = swap(active_u, ~old_u, unit.pool(jnp.abs(w).astype(jnp.float32)),
                 unit.pool(jnp.abs(g).astype(jnp.float32)), f)
      return unit.expand(new, old.shape)

    return jax.tree.map(leaf, masks, pruned, params, grads), state

  # The last update falls on end_step itself, so the final sparsity is reached
  # even when end_step is not a multiple of update_every (or is 0).
  return sparsify.SparsityMethod(
      init=init, update=update,
      should_update=lambda step: ((step >= begin_step) & (step <= end_step)
                                  & (((step > 0) & (step % update_every == 0))
                                     | (step == end_step))))
