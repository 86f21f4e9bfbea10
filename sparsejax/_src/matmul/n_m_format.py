"""N:M storage: the kept weights of an N:M matrix and their in-group positions.

An N:M weight keeps `n` entries in every group of `m` consecutive ones along
an axis (by default -2: for a Dense kernel ``(in, out)``, the inputs of each
output). `compress_n_m` stores the kept values and int8 in-group indices in
an `NMWeights`, which also carries `n`, `m`, the axis and the dense shape as
static pytree data, so `decompress_n_m` and `n_m_matmul` need nothing else
and the pattern stays static through `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src import n_m_masks


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "indices"],
                   meta_fields=["n", "m", "axis", "shape"])
@dataclasses.dataclass(frozen=True)
class NMWeights:
  """An N:M matrix stored compactly (a pytree; the pattern is static data).

  Groups run along `axis`; moved last, the dense array has shape `moved`
  ``= shape`` without `axis`, then ``shape[axis]``, and both arrays have
  shape ``moved[:-1] + (shape[axis] // m * n,)``: `n` entries per group, in
  group order.

  Attributes:
    values: the kept weights.
    indices: int8 position of each kept weight inside its group, in [0, m).
    n: kept entries per group.
    m: group size.
    axis: the grouped axis of the dense array, in [0, len(shape)).
    shape: the dense array's shape.

  Example:
    >>> c = sj.matmul.compress_n_m(kernel, 2, 4)   # 2:4 along the inputs
    >>> y = sj.matmul.n_m_matmul(x, c)             # x @ (kernel * mask)
  """

  values: jax.Array
  indices: jax.Array
  n: int
  m: int
  axis: int
  shape: tuple[int, ...]

  @property
  def dtype(self):
    return self.values.dtype


def _pattern(n, m) -> tuple[int, int]:
  _checks.n_m(n, m)
  if callable(n) or not _checks.is_concrete(n):
    raise ValueError(f"n={n!r} must be a Python integer: it fixes the shape of the stored values")
  return int(n), int(m)


def _moved(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  """`shape` with `axis` moved last."""
  return shape[:axis] + shape[axis + 1:] + (shape[axis],)


def compress_n_m(w: jax.Array, n: int, m: int, *, axis: int = n_m_masks.DEFAULT_AXIS,
                 mask: jax.Array | None = None) -> NMWeights:
  """The kept values and in-group indices of an N:M `w`.

  Args:
    w: the dense array; `m` divides ``w.shape[axis]``.
    n: kept entries per group, a Python integer in [0, m].
    m: group size.
    axis: the grouped axis (default -2, the inputs of an ``(in, out)``
      kernel, what `n_m_matmul` multiplies).
    mask: bool of `w`'s shape with exactly `n` True entries per group
      (checked when concrete; under jit a group with more keeps its first
      `n`, one with fewer stores zeros). Default: the `n` largest magnitudes
      of each group, ``n_m_mask(|w|, n, m, axis=axis)``.

  Returns:
    An `NMWeights` with ``decompress_n_m(c) == where(mask, w, 0)``.

  Example:
    >>> c = sj.matmul.compress_n_m(w, 2, 4)
    >>> np.testing.assert_array_equal(sj.matmul.decompress_n_m(c), w * mask)
  """
  n, m = _pattern(n, m)
  w = jnp.asarray(w)
  axis = n_m_masks.group_axis(w.shape, m, axis, "w")
  if mask is None:
    mask = n_m_masks.n_m_mask(jnp.abs(w), n, m, axis=axis)
  elif jnp.shape(mask) != w.shape or jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f"mask must be bool of the shape of w {w.shape}, got "
                     f"{jnp.result_type(mask)} of shape {jnp.shape(mask)}")
  moved = _moved(w.shape, axis)
  groups = moved[:-1] + (moved[-1] // m, m)
  gw = jnp.moveaxis(w, axis, -1).reshape(groups)
  gm = jnp.moveaxis(mask, axis, -1).reshape(groups)
  if _checks.is_concrete(gm) and bool(jnp.any(jnp.sum(gm, axis=-1) != n)):
    raise ValueError(f"mask is not {n}:{m} along axis {axis}: every group of {m} along it "
                     f"needs exactly {n} True entries")
  # Kept positions first, in order: a stable sort on "not kept".
  order = jnp.argsort(~gm, axis=-1, stable=True)[..., :n]
  kept = jnp.take_along_axis(gm, order, axis=-1)
  values = jnp.where(kept, jnp.take_along_axis(gw, order, axis=-1), 0)
  stored = moved[:-1] + (moved[-1] // m * n,)
  return NMWeights(values.reshape(stored), order.astype(jnp.int8).reshape(stored), n, m, axis,
                   tuple(w.shape))


def _check_weights(c, owner: str) -> tuple[int, ...]:
  """The stored shape of a valid `c`, or a ValueError."""
  if not isinstance(c, NMWeights):
    raise ValueError(f"{owner}: c must be an NMWeights (from sj.matmul.compress_n_m), got "
                     f"{type(c).__name__}")
  moved = _moved(c.shape, c.axis)
  stored = moved[:-1] + (moved[-1] // c.m * c.n,)
  if c.values.shape != stored or c.indices.shape != stored:
    raise ValueError(f"{owner}: c.values and c.indices of shapes {c.values.shape} and "
                     f"{c.indices.shape} do not hold a {c.n}:{c.m} array of shape {c.shape} "
                     f"along axis {c.axis}: expected {stored} for both")
  return stored


def decompress_n_m(c: NMWeights) -> jax.Array:
  """The dense array of `compress_n_m`: kept weights in place, zeros elsewhere.

  Example:
    >>> w_masked = sj.matmul.decompress_n_m(sj.matmul.compress_n_m(w, 2, 4))
  """
  _check_weights(c, "decompress_n_m")
  moved = _moved(c.shape, c.axis)
  groups = moved[:-1] + (moved[-1] // c.m,)
  values = c.values.reshape(groups + (c.n,))
  indices = c.indices.astype(jnp.int32).reshape(groups + (c.n,))
  one_hot = jax.nn.one_hot(indices, c.m, dtype=c.values.dtype)  # (..., n, m)
  dense = jnp.einsum("...nm,...n->...m", one_hot, values)
  return jnp.moveaxis(dense.reshape(moved), -1, c.axis)


def n_m_matmul(x: jax.Array, c: NMWeights) -> jax.Array:
  """``x @ W`` for a 2-d ``W`` of shape (K, N) compressed N:M along K.

  A jnp implementation: gathers the `n` inputs each kept weight multiplies,
  never forming the dense ``W``. Differentiable in `x` and ``c.values``.

  Args:
    x: [..., K]
    c: ``compress_n_m(W, n, m)`` of a (K, N) ``W`` (axis -2 or 0).

  Returns:
    [..., N] in x's dtype.

  Example:
    >>> c = sj.matmul.compress_n_m(kernel, 2, 4)   # kernel: (K, N)
    >>> y = sj.matmul.n_m_matmul(x, c)             # x: [..., K] -> [..., N]
  """
  _check_weights(c, "n_m_matmul")
  if len(c.shape) != 2 or c.axis != 0:
    raise ValueError(f"n_m_matmul needs c = compress_n_m(w, n, m, axis=-2) of a 2-d w (K, N), "
                     f"grouped along K; got w of shape {c.shape} grouped along axis {c.axis}")
  k, x = c.shape[0], jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x of shape {x.shape} cannot multiply a compressed w of shape "
                     f"{c.shape}: x.shape[-1] must be {k}")
  kept = c.values.shape[-1]  # per output: K // m * n
  group = jnp.arange(kept) // max(c.n, 1) * c.m  # first input of each kept weight's group
  rows = group[None, :] + c.indices.astype(jnp.int32)  # (N, kept) input index per weight
  gathered = jnp.take(x, rows, axis=-1)  # [..., N, kept]
  return jnp.einsum("...ok,ok->...o", gathered, c.values.astype(x.dtype))
