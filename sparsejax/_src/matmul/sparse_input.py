"""`sparse_input_matmul`: ``x @ w`` reading only the rows of `w` at nonzero inputs.

Decoding is memory-bound: one token's matmul reads the whole weight to do
two flops per weight. When the input has few nonzeros (a ReLU², top-k or
TEAL-thresholded activation), the rows of ``w`` at zero inputs contribute
nothing, so a kernel that skips them reads, and costs, a share of the weight
close to the input's density.

The nonzero channels of all rows together (their union) are listed once
(`nonzero_index`); every implementation walks that list, so its cost
follows the number of nonzeros, whatever they are, and the product is exact:
there is no budget to overflow. Rows share the list, so the saving is the
share of channels zero in *every* row: for 8 rows with independent patterns
at 90% sparsity, 57% of the rows of ``w`` are still read. Above
`_MAX_ROWS` rows (prefill) the union is nearly dense and the product is the
dense one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_ROWS = 16  # more rows than this: a dense product (their union is nearly dense)
_CHUNK = 8  # rows of w per step of the xla loop (measured on CPU: 8 beats 4, 12 and 16)
_DENSE_ABOVE = 0.7  # xla: a dense product when more of the channels than this are nonzero
# The default: a dense product for a w smaller than this, whose whole read costs less than
# listing the nonzeros (measured on CPU: the walk loses at 256 KiB, wins at 1 MiB and up).
_DENSE_BELOW_BYTES = 1 << 19


class NonzeroIndex(NamedTuple):
  """The input channels nonzero in any row, the list every implementation walks.

  Attributes:
    indices: int32 [K], the nonzero channels in increasing order, then the
      last of them repeated (0 when there is none), so that padding reads a
      row already read and multiplies it by zero.
    count: int32 [], how many channels are nonzero.
  """

  indices: jax.Array
  count: jax.Array

  def listed(self, x: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """(indices, ``x[:, indices]`` zero past `count`), padded to a multiple of `multiple`."""
    pad = -self.indices.shape[0] % multiple
    indices = jnp.pad(self.indices, (0, pad), mode="edge")
    live = jnp.arange(indices.shape[0]) < self.count
    return indices, jnp.where(live[None], jnp.take(x, indices, axis=1), 0)


def _running_count(nonzero: jax.Array) -> jax.Array:
  """Inclusive cumulative sum of bool [K] as int32, by two small triangular products.

  ``jnp.cumsum`` costs about 45 us at K=2048 on CPU, more than reading the
  rows it lists at 90% sparsity; blocks of 64 summed by a [64, 64] and a
  [K/64, K/64] triangular matrix cost about 15 us. Counts up to 2^24 are exact in float32.
  """
  k = nonzero.shape[0]
  blocks = -(-k // 64)
  ones = jnp.pad(nonzero, (0, blocks * 64 - k)).astype(jnp.float32).reshape(blocks, 64)
  dot = functools.partial(jnp.dot, precision=lax.Precision.HIGHEST)
  within = dot(ones, jnp.triu(jnp.ones((64, 64), jnp.float32)))  # count up to each entry
  before = dot(within[:, -1], jnp.triu(jnp.ones((blocks, blocks), jnp.float32), 1))
  return (within + before[:, None]).reshape(-1)[:k].astype(jnp.int32)


def nonzero_index(x: jax.Array) -> NonzeroIndex:
  """The `NonzeroIndex` of rows ``x`` [M, K]: channels nonzero in at least one row."""
  k = x.shape[1]
  nonzero = jnp.any(x != 0, axis=0)
  position = _running_count(nonzero) - 1
  count = position[-1] + 1
  channel = jnp.arange(k, dtype=jnp.int32)
  indices = jnp.zeros(k, jnp.int32).at[jnp.where(nonzero, position, k)].set(channel, mode="drop")
  last = indices[jnp.maximum(count - 1, 0)]
  return NonzeroIndex(jnp.where(channel < count, indices, last), count)


def _validate_args(x, w, implementation):
  for name, a in [("x", x), ("w", w)]:
    if not (hasattr(a, "ndim") and hasattr(a, "dtype")):
      raise ValueError(f"sparse_input_matmul: {name} must be an array, got {type(a).__name__}")
  if w.ndim != 2:
    raise ValueError(f"sparse_input_matmul: w must be a matrix [K, N], got shape {w.shape}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"sparse_input_matmul: x of shape {x.shape} cannot multiply w of shape "
                     f"{w.shape}: x.shape[-1] must be {w.shape[0]}")
  if x.dtype != w.dtype or x.dtype not in _DTYPES:
    raise ValueError("sparse_input_matmul: x and w must share one of float32, bfloat16, "
                     f"float16, got x {x.dtype} and w {w.dtype}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"sparse_input_matmul: unknown implementation {implementation!r}; "
                     f"expected one of {IMPLEMENTATIONS} or None")


def reference(x: jax.Array, w: jax.Array) -> jax.Array:
  """The oracle: the dense product of rows ``x`` [M, K] and ``w`` [K, N], in float32."""
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def _xla_walk(x: jax.Array, w: jax.Array, index: NonzeroIndex) -> jax.Array:
  """``x @ w`` as a loop over `index`'s rows of `w`, `_CHUNK` rows a step."""
  indices, values = index.listed(x, _CHUNK)
  values = values.astype(jnp.float32)

  def step(c, acc):
    for u in range(_CHUNK):  # static unroll: independent row reads
      i = c * _CHUNK + u
      row = lax.dynamic_slice_in_dim(w, indices[i], 1, 0).astype(jnp.float32)
      acc = acc + values[:, i][:, None] * row
    return acc

  steps = (index.count + _CHUNK - 1) // _CHUNK
  return lax.fori_loop(0, steps, step, jnp.zeros((x.shape[0], w.shape[1]), jnp.float32))


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
  # The count alone decides; the list is built only where it is walked.
  count = jnp.sum(jnp.any(x != 0, axis=0), dtype=jnp.int32)
  return lax.cond(count > _DENSE_ABOVE * x.shape[1], lambda: _dense(x, w),
                  lambda: _xla_walk(x, w, nonzero_index(x)))


def default_implementation(w: jax.Array) -> str:
  """The fastest implementation for `w`: dense if small, else the backend's kernel where it tiles."""
  # pylint: disable=g-import-not-at-top
  if w.size * jnp.dtype(w.dtype).itemsize < _DENSE_BELOW_BYTES:
    return "dense"
  backend, n = jax.default_backend(), w.shape[1]
  if backend == "gpu":
    from sparsejax._src.matmul import sparse_input_pallas_gpu as kernel
    return "pallas_triton" if kernel.tiles(n) else "xla"
  if backend == "tpu":
    from sparsejax._src.matmul import sparse_input_pallas_tpu as kernel
    return "pallas_tpu" if kernel.tiles(n) else "xla"
  return "xla"


def _forward(x2, w, implementation, interpret):
  if implementation == "dense" or x2.shape[0] > _MAX_ROWS or x2.shape[0] == 0:
    return _dense(x2, w)
  if implementation == "xla":
    return _xla(x2, w)
  index = nonzero_index(x2)
  # pylint: disable=g-import-not-at-top
  if implementation == "pallas_triton":
    from sparsejax._src.matmul import sparse_input_pallas_gpu as kernel
  else:
    from sparsejax._src.matmul import sparse_input_pallas_tpu as kernel
  return kernel.sparse_input_matmul(x2, w, index, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x2, w, implementation, interpret):
  return _forward(x2, w, implementation, interpret).astype(x2.dtype)


def _matmul_fwd(x2, w, implementation, interpret):
  return _matmul(x2, w, implementation, interpret), (x2, w)


def _matmul_bwd(implementation, interpret, residuals, g):
  # The product is linear: its gradients are the dense ones, zero inputs included.
  del implementation, interpret
  x2, w = residuals
  g = g.astype(jnp.float32)
  dx = jnp.dot(g, w.T.astype(jnp.float32)).astype(x2.dtype)
  dw = jnp.dot(x2.T.astype(jnp.float32), g).astype(w.dtype)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.jit, static_argnames=("implementation", "interpret"))
def _jitted(x, w, implementation, interpret):
  x2 = x.reshape(-1, x.shape[-1])
  if implementation == "reference":
    y = reference(x2, w).astype(x.dtype)
  else:
    y = _matmul(x2, w, implementation, interpret)
  return y.reshape(*x.shape[:-1], w.shape[1])


def sparse_input_matmul(x: jax.Array, w: jax.Array, *, implementation: str | None = None,
                        interpret: bool | None = None) -> jax.Array:
  """``x @ w`` reading only the rows of `w` at input channels that are nonzero.

  For decoding with sparse activations (1-16 rows of ``x``): the channels
  nonzero in any row are listed, and only those rows of ``w`` are read, so
  the cost follows the input's density. The result is exact whatever the
  number of nonzeros. With more than 16 rows (prefill) the union of the
  rows' channels is nearly dense and the product is the dense one.

  Gradients are the dense product's (``g @ w.T`` and ``x.T @ g``): the
  function is ``x @ w``, the sparsity only skips work.

  Args:
    x: [..., K], mostly zeros (sparsified activations).
    w: [K, N], x's dtype (float32, bfloat16 or float16).
    implementation: "reference" (the dense product in float32, the oracle),
      "xla" (a loop over the listed rows, or the dense product when more
      than 70% of the channels are nonzero, where the loop stops paying on
      CPU), "pallas" (the default backend's kernel: "pallas_triton" on GPU
      and in interpret mode on CPU, "pallas_tpu" on TPU), or None for the
      fastest available: the dense product for a w under 512 KiB (listing
      the nonzeros costs more than reading it all), else Pallas on GPU and
      TPU and "xla" elsewhere.
    interpret: run Pallas kernels in the interpreter; default True on CPU.

  Returns:
    [..., N] in x's dtype, accumulated in float32.

  Example:
    >>> h = sj.activations.topk(jax.nn.relu(x @ w_up), 0.1)    # [1, 4096], 90% zeros
    >>> y = sj.matmul.sparse_input_matmul(h, w_down)            # reads 10% of w_down
  """
  _validate_args(x, w, implementation)
  if implementation is None:
    implementation = default_implementation(w)
  if implementation == "pallas":
    implementation = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return _jitted(x, w, implementation, bool(interpret))
