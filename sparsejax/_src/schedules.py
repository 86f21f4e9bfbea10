"""Schedules (plain ``step -> value`` callables) and the one mask-update rule.

Anywhere a schedule is accepted, a constant works too, and so does any optax
schedule (``optax.linear_schedule(...)``, ``optax.cosine_decay_schedule(...)``).
Steps are the `sparsify` wrapper's own update count: 0 for the first `update`.

Step arguments mean the same thing everywhere:

- masks change for every step ``t`` with ``begin_step <= t <= end_step`` and
  ``(t - begin_step) % update_every == 0``, and for ``end_step`` itself
  (`update_steps`): the update call before step ``t`` (the ``t``-th) sets
  them, so they hold after ``t`` optimizer steps. Never for step 0, whose
  masks the method's ``init`` sets for ``schedule(0)``;
- a schedule that ramps between `begin_step` and `end_step` reaches its final
  value at `end_step` (inclusive), so the last mask update lands on it.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]


def as_schedule(value: ScalarOrSchedule, name: str = "sparsity") -> Schedule:
  """A float32 schedule from a schedule or a constant; constants are range-checked."""
  if callable(value):
    return lambda step: jnp.asarray(value(step), jnp.float32)
  _checks.fraction(name, value)
  return lambda step: jnp.asarray(value, jnp.float32)


def constant(value: ScalarOrSchedule, name: str, owner: str) -> ScalarOrSchedule:
  """`value` checked as a fixed fraction, for methods that cannot follow a schedule."""
  if callable(value):
    raise ValueError(
        f"{owner}: {name} must be a float in [0, 1), not a schedule: the mask is fixed once, "
        "so a changing sparsity would be ignored. Use sj.magnitude or a drop-and-grow method "
        "(sj.rigl, sj.set_evolution, sj.granet, sj.srigl) to follow a schedule.")
  _checks.fraction(name, value, schedule=False)
  return value


def update_steps(*, update_every: Any, begin_step: Any = 0,
                 end_step: Any = None) -> Callable[[jax.Array], jax.Array]:
  """The mask-update rule of every method: ``should_update(step) -> bool``.

  True at each step ``t > 0`` with ``begin_step <= t <= end_step`` and
  ``(t - begin_step) % update_every == 0``, and at ``end_step`` (if > 0).
  ``end_step=None`` means no end. All three may be traced.

  Example:
    >>> rule = sj.update_steps(update_every=100, end_step=250)
    >>> [int(t) for t in range(301) if rule(t)]
    [100, 200, 250]
  """
  if end_step is None:
    _checks.integer("update_every", update_every)
    _checks.integer("begin_step", begin_step, minimum=0)
  else:
    _checks.steps(begin_step=begin_step, end_step=end_step, update_every=update_every)

  def should_update(step):
    step = jnp.asarray(step, jnp.int32)
    on = (step >= begin_step) & ((step - begin_step) % update_every == 0)
    if end_step is not None:
      on = (on & (step <= end_step)) | (step == end_step)
    return on & (step > 0)

  return should_update


def cubic_schedule(
    sparsity: float,
    *,
    end_step: int,
    begin_step: int = 0,
    init_sparsity: float = 0.0,
    power: float = 3.0,
) -> Schedule:
  """Zhu & Gupta's gradual pruning ramp from `init_sparsity` to `sparsity`.

  ``s(t) = sparsity + (init_sparsity - sparsity) * (1 - (t - begin) / (end - begin)) ** power``
  for ``begin_step <= t <= end_step``: `init_sparsity` before `begin_step`,
  `sparsity` from `end_step` on. With ``power=3`` sparsity rises fast at
  first and slowly at the end.

  Reference: To prune, or not to prune: exploring the efficacy of pruning for
  model compression. Zhu & Gupta, 2017. arXiv:1710.01878.

  Args:
    sparsity: final sparsity, in [0, 1).
    end_step: the step at which `sparsity` is reached, >= `begin_step`.
    begin_step: first step of the ramp.
    init_sparsity: sparsity before `begin_step`, in [0, 1).
    power: exponent of the ramp, > 0.

  Returns:
    a schedule ``step -> sparsity`` (float32).

  Example:
    >>> schedule = sj.cubic_schedule(0.9, begin_step=100, end_step=1000)
    >>> round(float(schedule(1000)), 6)
    0.9
  """
  _checks.fraction("sparsity", sparsity, schedule=False)
  _checks.fraction("init_sparsity", init_sparsity, schedule=False)
  _checks.steps(begin_step=begin_step, end_step=end_step)
  if _checks.is_concrete(power) and not (
      isinstance(power, (int, float, np.integer, np.floating, jax.Array))
      and not isinstance(power, bool) and 0 < float(power) < math.inf):
    raise ValueError(f"power={power!r} must be a finite number > 0")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    span = jnp.maximum(jnp.asarray(end_step - begin_step, jnp.float32), 1.0)
    frac = jnp.clip((step - begin_step) / span, 0.0, 1.0)
    frac = jnp.where(step >= end_step, 1.0, frac)  # also when begin == end
    init = jnp.asarray(init_sparsity, jnp.float32)
    final = jnp.asarray(sparsity, jnp.float32)
    return final + (init - final) * (1.0 - frac) ** power

  return schedule


def one_shot(sparsity: float, *, step: int = 0) -> Schedule:
  """Sparsity 0 before `step`, `sparsity` from `step` on.

  Example:
    >>> schedule = sj.one_shot(0.8, step=500)
    >>> round(float(schedule(499)), 6), round(float(schedule(500)), 6)
    (0.0, 0.8)
  """
  _checks.fraction("sparsity", sparsity, schedule=False)
  _checks.integer("step", step, minimum=0)
  return lambda t: jnp.where(jnp.asarray(t) >= step, jnp.asarray(sparsity, jnp.float32), 0.0)


def piecewise(values: dict[int, Any]) -> Schedule:
  """A step schedule: ``values[b]`` from step ``b`` on (an N:M ramp, say).

  Example:
    >>> n = sj.piecewise({0: 4, 1000: 2, 2000: 1})   # 4:4 -> 2:4 -> 1:4
    >>> method = sj.n_m(n, 4)
  """
  if not isinstance(values, dict) or not values or min(values) != 0:
    raise ValueError(f"piecewise needs a dict {{step: value}} with a value from step 0, got "
                     f"{values!r}")
  steps = sorted(values)

  def schedule(step):
    out = jnp.asarray(values[steps[0]])
    for b in steps[1:]:
      out = jnp.where(jnp.asarray(step) >= b, values[b], out)
    return out

  return schedule


def cosine_decay(initial: float, *, begin_step: Any, end_step: Any) -> Schedule:
  """``initial * (1 + cos(pi * progress)) / 2``: `initial` at `begin_step`, 0 at `end_step`.

  The default drop fraction of the drop-and-grow methods (RigL's).
  """

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    span = jnp.maximum(jnp.asarray(end_step - begin_step, jnp.float32), 1.0)
    progress = jnp.clip((step - begin_step) / span, 0.0, 1.0)
    progress = jnp.where(step >= end_step, 1.0, progress)  # also when begin == end
    return initial * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  return schedule


def drop_fraction_schedule(drop_fraction: Any, default: float, begin_step: Any,
                           end_step: Any) -> Schedule:
  """A drop fraction as a schedule; None gives `cosine_decay` from `default` to 0 at `end_step`."""
  if drop_fraction is None:
    return cosine_decay(default, begin_step=begin_step, end_step=end_step)
  _checks.fraction("drop_fraction", drop_fraction, closed=True)
  if callable(drop_fraction):
    return lambda step: jnp.asarray(drop_fraction(step), jnp.float32)
  return lambda step: jnp.asarray(drop_fraction, jnp.float32)
