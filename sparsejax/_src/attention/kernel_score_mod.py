"""A traced score_mod evaluated inside a Pallas kernel, its captured arrays left in their refs.

The arrays a score_mod captures are kernel inputs (`mods.trace`), refs in the
kernel. `ScoreMod.apply` evaluates its jaxpr with each as a `View` of its ref,
which indexing ops (``dynamic_slice``, unit-stride ``slice``, ``squeeze``:
``slopes[h]``, ``table[h]``; calls inlined) narrow without reading; any other
op reads the window. The backend's `Policy` says what a read and a gather
from a view are and what is refused: Triton loads windows and elements at
array indices (`pallas_gpu`), Mosaic reads SMEM one scalar at a time or
arrays whole from VMEM (`pallas_tpu`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src.attention import mods as mods_lib

_NARROWING = frozenset({"dynamic_slice", "slice", "squeeze"})
# Calls are inlined so that views reach the ops inside them (remat2 is
# jax.checkpoint); custom derivatives only when a view or `Parts` goes in,
# keeping their rules otherwise.
_CALLS = frozenset({"jit", "pjit", "closed_call", "remat2"})
_CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call"})


@dataclasses.dataclass(frozen=True)
class View:
  """A window of a captured array still in its ref.

  Attributes:
    ref: its ref, or what the backend passed for it.
    aval: the array's shape and dtype.
    start: per array dimension, the window's start (int or int32 scalar).
    size: per array dimension, the window's size.
    kept: the array dimensions the window's shape keeps, in order; the
      others are indexed away at their start.
  """

  ref: Any
  aval: Any
  start: tuple[Any, ...]
  size: tuple[int, ...]
  kept: tuple[int, ...]

  @classmethod
  def whole(cls, ref, aval) -> View:
    shape = tuple(aval.shape)
    return cls(ref, aval, (0,) * len(shape), shape, tuple(range(len(shape))))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.size[d] for d in self.kept)

  def narrowed(self, eqn, rest) -> View | None:
    """The window `eqn` (a narrowing op, index operands `rest`) cuts, or None if it cannot."""
    start, size, kept, params = list(self.start), list(self.size), self.kept, eqn.params
    name = eqn.primitive.name
    if name == "dynamic_slice":
      for d, i, n in zip(kept, rest, params["slice_sizes"]):
        start[d] = start[d] + clamp(i, 0, size[d] - n)  # dynamic_slice clamps its starts
        size[d] = n
    elif name == "slice" and all(s == 1 for s in params["strides"] or ()):
      for d, lo, hi in zip(kept, params["start_indices"], params["limit_indices"]):
        start[d], size[d] = start[d] + lo, hi - lo
    elif name == "squeeze":
      kept = tuple(d for a, d in enumerate(kept) if a not in params["dimensions"])
    else:
      return None
    return dataclasses.replace(self, start=tuple(start), size=tuple(size), kept=kept)


class Parts:
  """A concatenation along the last axis kept in parts: a gather's index vectors.

  A backend can read the index of each dimension (`column`) without a slice.
  """

  def __init__(self, values: Sequence[jax.Array]):
    self.values = list(values)
    self.shape = (*self.values[0].shape[:-1], sum(v.shape[-1] for v in self.values))

  @staticmethod
  def column(indices, k: int) -> jax.Array | None:
    """``indices[..., k]`` where it is a whole part of width 1, else None (it needs a slice)."""
    for part in indices.values if isinstance(indices, Parts) else [indices]:
      n = part.shape[-1]
      if k < n:
        return part.reshape(part.shape[:-1]) if n == 1 else None
      k -= n
    raise AssertionError("index out of range")


class Policy:
  """A backend's side of the evaluation (the defaults gather nothing and refuse nothing)."""

  def read(self, view: View) -> jax.Array:
    """The value of a window, for an op that needs it."""
    raise NotImplementedError

  def gather(self, view: View, indices, eqn) -> jax.Array | None:
    """A ``lax.gather`` from a window (indices a value or `Parts`), or None to read and bind."""
    del view, indices, eqn
    return None

  def check(self, eqn) -> None:
    """Raise a ValueError if the backend cannot lower `eqn` (called before each bind)."""
    del eqn


def value(x, policy: Policy):
  """`x` as an array: a view read, parts concatenated."""
  if isinstance(x, View):
    return policy.read(x)
  if isinstance(x, Parts):
    return lax.concatenate(x.values, len(x.shape) - 1)
  return x


def clamp(x, lo, hi):
  """min(max(x, lo), hi), in Python where x is a Python or NumPy int."""
  if isinstance(x, (int, np.integer)):
    return min(max(int(x), lo), hi)
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _eval_eqn(eqn, args, policy: Policy):
  name, params = eqn.primitive.name, eqn.params
  if args and isinstance(args[0], View):
    if name == "gather":
      indices = args[1] if isinstance(args[1], Parts) else value(args[1], policy)
      out = policy.gather(args[0], indices, eqn)
      if out is not None:
        return [out]
      args = [args[0], indices]
    elif name in _NARROWING:
      narrowed = args[0].narrowed(eqn, [value(a, policy) for a in args[1:]])
      if narrowed is not None:
        return [narrowed]
  lazy = any(isinstance(a, (View, Parts)) for a in args)
  if (name == "concatenate" and not lazy and args[0].ndim
      and params["dimension"] == args[0].ndim - 1):
    return [Parts(args)]
  if name in _CALLS or (lazy and name in _CUSTOM_CALLS):
    sub = params.get("jaxpr", params.get("call_jaxpr"))
    if sub is not None:
      closed = sub if isinstance(sub, jex_core.ClosedJaxpr) else jex_core.ClosedJaxpr(sub, ())
      return _eval_jaxpr(closed.jaxpr, closed.consts, args, policy)
  args = [value(a, policy) for a in args]
  policy.check(eqn)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params))
  return out if eqn.primitive.multiple_results else [out]


def _eval_jaxpr(jaxpr, consts, args, policy: Policy):
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]  # noqa: E731
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    env.update(zip(eqn.outvars, _eval_eqn(eqn, [read(v) for v in eqn.invars], policy)))
  return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreMod:
  """A score_mod traced at block shapes (static, hashed by identity).

  Attributes:
    fn: from `mods.trace`: ``fn(score, b, h, q_idx, kv_idx, *consts)`` (the
      XLA pass of the captured arrays' gradients uses it).
    jaxpr: fn at block shapes, the captured arrays its trailing inputs.
  """

  fn: Any
  jaxpr: jex_core.ClosedJaxpr

  @classmethod
  def trace(cls, score_mod, block_q: int, block_kv: int):
    """(`ScoreMod`, the arrays it captures) for blocks of [block_q, block_kv] scores."""
    index = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    args = (jax.ShapeDtypeStruct((block_q, block_kv), jnp.float32), index(), index(),
            index(block_q, 1), index(1, block_kv))  # as the kernels pass them
    fn, consts = mods_lib.trace(score_mod, *args)
    consts = tuple(jnp.asarray(c) for c in consts)
    avals = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in consts]
    return cls(fn, jax.make_jaxpr(fn)(*args, *avals)), consts

  @property
  def avals(self) -> Sequence[Any]:
    """The captured arrays' shapes and dtypes."""
    return self.jaxpr.in_avals[5:]

  def apply(self, policy: Policy, consts, score, b, h, q_idx, kv_idx) -> jax.Array:
    """The modified scores of a block; `consts`: each captured array as a `View` or a value."""
    out, = _eval_jaxpr(self.jaxpr.jaxpr, self.jaxpr.consts, [score, b, h, q_idx, kv_idx, *consts],
                       policy)
    return value(out, policy)
