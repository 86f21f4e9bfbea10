"""Argument checks shared by the public API, with one wording for each.

Every check says what was given and what was expected. Checks run on
concrete values only: a traced value (``optax.inject_hyperparams`` under
``jax.jit``) passes through unchecked, except where an argument shapes the
computation and must be static (`static`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """Whether `x` is not a tracer, so it can be validated."""
  return not isinstance(x, jax.core.Tracer)


def is_int(x: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def static(name: str, value: Any, owner: str) -> None:
  """Raises ValueError if `value` is an array (traced or not): `name` shapes the computation."""
  if isinstance(value, jax.Array):
    raise ValueError(
        f"{owner}: {name} shapes the computation and must be a Python value, got an array. "
        f"Under optax.inject_hyperparams pass static_args=({name!r},).")


def fraction(name: str, value: Any, *, closed: bool = False, schedule: bool = True) -> None:
  """`value` in [0, 1) ([0, 1] if `closed`); a schedule or a traced value is not checked."""
  if schedule and callable(value):
    return
  if not is_concrete(value):
    return
  accepts = "a number or a schedule step -> value" if schedule else "a number"
  if value is None or isinstance(value, (str, bytes, bool, np.bool_)) or callable(value):
    raise ValueError(f"{name}={value!r} must be {accepts}")
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be {accepts}") from None
  if v.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
  v = float(v)
  ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
  if not ok:
    raise ValueError(f"{name}={v} must lie in {'[0, 1]' if closed else '[0, 1)'}")


def integer(name: str, value: Any, *, minimum: int | None = 1) -> None:
  """`value` an integer >= `minimum` (any integer if None); traced values pass."""
  if not is_concrete(value):
    return
  try:
    v = np.asarray(value)
    ok = (v.shape == () and not isinstance(value, (bool, np.bool_, str, bytes))
          and v.dtype != np.bool_ and float(v).is_integer()
          and (minimum is None or int(v) >= minimum))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} must be {expected}")


def static_int(name: str, value: Any, *, minimum: int | None = None) -> int:
  """`value` a Python or NumPy integer (not a float, bool or array) >= `minimum`; returns it."""
  if not is_int(value) or (minimum is not None and value < minimum):
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} must be {expected}")
  return int(value)


def static_float(name: str, value: Any) -> None:
  """`value` a Python or NumPy number (it shapes the computation), not an array or a bool."""
  if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
    raise ValueError(f"{name} must be a Python float (it shapes the computation), "
                     f"got {value!r}")


def steps(*, begin_step: Any, end_step: Any, update_every: Any = 1) -> None:
  """Step arguments: integers >= 0 (update_every >= 1), ``begin_step <= end_step``."""
  integer("update_every", update_every)
  integer("begin_step", begin_step, minimum=0)
  integer("end_step", end_step, minimum=0)
  if is_concrete(begin_step) and is_concrete(end_step) and int(end_step) < int(begin_step):
    raise ValueError(f"end_step={end_step} must be >= begin_step={begin_step}")


def choice(name: str, value: Any, options: tuple[Any, ...]) -> None:
  if value not in options:
    raise ValueError(f"{name}={value!r} must be one of {options}")


def key(value: Any) -> None:
  """One JAX PRNG key (typed, or raw uint32[2])."""
  ok = isinstance(value, jax.Array) and (
      jnp.issubdtype(value.dtype, jax.dtypes.prng_key)
      or (value.dtype == jnp.uint32 and value.shape == (2,)))
  if not ok:
    raise ValueError(f"key must be a JAX PRNG key such as jax.random.key(0), got {value!r}")
  if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape != ():
    raise ValueError(f"key must be a single PRNG key such as jax.random.key(0), got an array of "
                     f"keys of shape {value.shape}")


def axis(value: Any, shape: tuple[int, ...], what: str) -> int:
  """`value` a valid axis of `shape`; returns it normalized to >= 0."""
  if not is_int(value):
    raise ValueError(f"axis={value!r} must be an integer")
  if not -len(shape) <= value < len(shape):
    raise ValueError(f"axis={value} is out of range for {what} of shape {tuple(shape)}")
  return int(value) % len(shape)


def n_m(n: Any, m: Any) -> None:
  """An N:M pattern: integer ``m >= 1`` and ``0 <= n <= m`` (n may be a schedule or traced)."""
  if not is_int(m) or m < 1:
    raise ValueError(f"m={m!r} must be an integer >= 1")
  if callable(n) or not is_concrete(n):
    return
  try:
    ok = (np.ndim(n) == 0 and not isinstance(n, (str, bytes, bool, np.bool_))
          and float(n).is_integer())
  except (TypeError, ValueError):
    ok = False
  if not ok or not 0 <= int(n) <= m:
    raise ValueError(f"n={n!r} must be an integer with 0 <= n <= m={m}")


def floating_array(name: str, x: Any) -> None:
  """`x` an array of a floating dtype."""
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got "
                     f"{getattr(x, 'dtype', type(x).__name__)}")


def density(value: Any, owner: str) -> float:
  """A density in (0, 1]: the share of entries kept or trained; returns it as a float."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"{owner}: density={value!r} must be a float in (0, 1]")
  return float(value)


def vmem_limit(value: Any) -> None:
  """A Mosaic TPU scoped-VMEM limit: None or an int >= 1."""
  if value is not None and (not is_int(value) or value < 1):
    raise ValueError(f"vmem_limit_bytes={value!r} must be an integer >= 1 or None")
