"""Sparsity schedules: plain ``step -> sparsity`` callables.

Anywhere a schedule is accepted, a constant (a float or a scalar array) works
too. Steps are the wrapper's own update count (0 for the first `update`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]


def is_concrete(x: Any) -> bool:
  """Whether `x` is a concrete number (not a tracer), so it can be validated."""
  return not isinstance(x, jax.core.Tracer)


def check_fraction(name: str, value: Any, *, closed: bool = False) -> None:
  """Raises ValueError unless a concrete `value` lies in [0, 1) ([0, 1] if closed).

  Schedules and traced values (as `optax.inject_hyperparams` passes) are not
  checked here.
  """
  if callable(value) or not is_concrete(value):
    return
  if value is None or isinstance(value, (str, bytes)):
    # np.asarray would read None as nan and "0.5" as 0.5.
    raise ValueError(f"{name}={value!r} must be a number or a schedule")
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be a number or a schedule") from None
  if v.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
  v = float(v)
  ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
  if not ok:
    interval = "[0, 1]" if closed else "[0, 1)"
    raise ValueError(f"{name}={v} must lie in {interval}")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
  """Raises ValueError unless a concrete `value` is an integer >= `minimum`."""
  if not is_concrete(value):
    return
  try:
    v = np.asarray(value, dtype=np.float64)
    ok = v.shape == () and float(v).is_integer() and int(v) >= minimum
  except (TypeError, ValueError):
    ok = False
  if not ok or isinstance(value, bool):
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def as_schedule(value: ScalarOrSchedule, name: str = "sparsity") -> Schedule:
  """A schedule from a schedule or a constant; constants are range-checked."""
  if callable(value):
    return value
  check_fraction(name, value)
  return lambda step: jnp.asarray(value, jnp.float32)


def polynomial_schedule(
    init_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
) -> Schedule:
  """Gradual pruning schedule of Zhu & Gupta (2017).

  ``s(t) = final + (init - final) * (1 - (t - begin) / (end - begin)) ** power``
  for ``begin <= t <= end``; ``init`` before ``begin_step`` and ``final`` after
  ``end_step``. With ``power=3`` sparsity rises fast at first and slowly at
  the end.

  Reference: To prune, or not to prune: exploring the efficacy of pruning for
  model compression. Zhu & Gupta, 2017. arXiv:1710.01878.

  Args:
    init_sparsity: sparsity before `begin_step`, in [0, 1).
    final_sparsity: sparsity from `end_step` on, in [0, 1).
    begin_step: first step of the ramp.
    end_step: last step of the ramp, >= `begin_step`.
    power: exponent of the ramp, > 0.

  Returns:
    A schedule ``step -> sparsity`` (float32).

  Example:
    >>> schedule = sj.polynomial_schedule(0.0, 0.9, begin_step=100, end_step=1000)
    >>> round(float(schedule(1000)), 6)
    0.9
  """
  check_fraction("init_sparsity", init_sparsity)
  check_fraction("final_sparsity", final_sparsity)
  check_positive_int("begin_step", begin_step, minimum=0)
  check_positive_int("end_step", end_step, minimum=0)
  if is_concrete(begin_step) and is_concrete(end_step) and end_step < begin_step:
    raise ValueError(f"{end_step=} must be >= {begin_step=}")
  if is_concrete(power):
    if not isinstance(power, (int, float, np.integer, np.floating, jax.Array)) or isinstance(
        power, bool):
      raise ValueError(f"power={power!r} must be a number > 0")
    if not 0 < float(power) < np.inf:
      raise ValueError(f"{power=} must be a finite number > 0")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    span = jnp.maximum(jnp.asarray(end_step - begin_step, jnp.float32), 1.0)
    frac = jnp.clip((step - begin_step) / span, 0.0, 1.0)
    # Past `end_step` the ramp is done, also when begin == end.
    frac = jnp.where(step >= end_step, 1.0, frac)
    init = jnp.asarray(init_sparsity, jnp.float32)
    final = jnp.asarray(final_sparsity, jnp.float32)
    return final + (init - final) * (1.0 - frac) ** power

  return schedule


def one_shot(sparsity: float, step: int = 0) -> Schedule:
  """Sparsity 0 before `step`, `sparsity` from `step` on.

  Example:
    >>> schedule = sj.one_shot(0.8, step=500)
    >>> round(float(schedule(499)), 6), round(float(schedule(500)), 6)
    (0.0, 0.8)
  """
  check_fraction("sparsity", sparsity)
  check_positive_int("step", step, minimum=0)

  def schedule(t):
    return jnp.where(jnp.asarray(t) >= step, jnp.asarray(sparsity, jnp.float32), 0.0)

  return schedule
