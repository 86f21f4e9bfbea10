"""`block_sparse_matmul`: one API, four implementations that agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.matmul import format as format_lib
from sparsejax._src.matmul import pallas_gpu
from sparsejax._src.matmul import pallas_tpu
from sparsejax._src.matmul import reference

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check(x, w):
  if not isinstance(w, format_lib.BlockSparseMatrix):
    raise ValueError(f"w must be a sj.BlockSparseMatrix (BlockSparseMatrix.from_dense), got "
                     f"{type(w).__name__}")
  if w.values.ndim != 4:
    raise ValueError(f"w.values must be [col_blocks, max_per_col, bk, bn], got shape "
                     f"{w.values.shape}")
  cols, slots = w.values.shape[:2]
  if w.t_col.ndim != 2:
    raise ValueError(f"w.t_col must be a 2-d integer array [row_blocks, max_per_row], got "
                     f"shape {w.t_col.shape}")
  rows, per_row = w.t_col.shape
  expected = {"row_index": (cols, slots), "count": (cols,), "t_col": (rows, per_row),
              "t_slot": (rows, per_row), "t_count": (rows,)}
  for name, shape in expected.items():
    field = getattr(w, name)
    if field.shape != shape or not jnp.issubdtype(field.dtype, jnp.integer):
      raise ValueError(f"w.{name} must be an integer array of shape {shape}, got "
                       f"{field.dtype} of shape {field.shape}")
  for name, limit in [("row_index", rows), ("count", slots + 1), ("t_col", cols),
                      ("t_slot", slots), ("t_count", per_row + 1)]:
    field = getattr(w, name)
    if not isinstance(field, jax.core.Tracer):
      host = np.asarray(field)
      if host.size and (host.min() < 0 or host.max() >= limit):
        raise ValueError(f"w.{name} has entries outside [0, {limit}): min {host.min()}, "
                         f"max {host.max()}")
  if not (hasattr(x, "ndim") and hasattr(x, "dtype")):
    raise ValueError(f"x must be an array [..., K], got {type(x).__name__}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x of shape {x.shape} cannot multiply w of shape {w.shape}: x.shape[-1] "
                     f"must be {w.shape[0]}")
  if x.dtype != w.dtype or x.dtype not in _DTYPES:
    raise ValueError(f"x and w must share one of float32, bfloat16, float16, got x {x.dtype} "
                     f"and w {w.dtype}")


def default_implementation(w: format_lib.BlockSparseMatrix) -> str:
  """The fastest implementation for the default backend and this matrix."""
  backend = jax.default_backend()
  bk, bn = w.block_shape
  pow2 = all(b >= 16 and not b & (b - 1) for b in (bk, bn))
  if backend == "gpu" and pow2:
    return "pallas_triton"
  if backend == "tpu" and bk % 128 == 0 and bn % 128 == 0:
    return "pallas_tpu"
  return "xla"


def block_sparse_matmul(x: jax.Array, w: format_lib.BlockSparseMatrix, *,
                        implementation: str | None = None, interpret: bool | None = None,
                        block_m: int | None = None) -> jax.Array:
  """``x @ w`` for a block-sparse ``w``, touching only its active blocks.

  Args:
    x: [..., K]
    w: a `BlockSparseMatrix` of shape [K, N] and x's dtype.
    implementation: "reference" (dense masked product in float32, the
      oracle), "xla" (jnp over the active blocks), "pallas" (the Pallas
      kernel of the default backend: "pallas_triton" on GPU and in
      interpret mode on CPU, "pallas_tpu" on TPU), or None for the fastest
      available: Pallas on GPU and TPU, "xla" elsewhere.
    interpret: run Pallas kernels in the interpreter; default True on CPU.
    block_m: rows of x per Pallas program (default 64 on GPU, 128 on TPU);
      x's rows are padded to a multiple.

  Returns:
    [..., N] in x's dtype, accumulated in float32. Differentiable in x and in
    ``w.values`` (gradients for the active blocks only; padded slots get 0).

  Example:
    >>> w = sj.BlockSparseMatrix.from_dense(kernel, sj.block_diagonal_mask((8, 8), 4))
    >>> y = sj.block_sparse_matmul(x, w)
  """
  _check(x, w)
  if implementation is None:
    implementation = default_implementation(w)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS} or None")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if implementation == "pallas":
    implementation = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if implementation == "reference":
    y = reference.matmul_reference(x2, w)
  elif implementation == "xla":
    y = reference.matmul_xla(x2, w)
  else:
    kernel = pallas_tpu if implementation == "pallas_tpu" else pallas_gpu
    sizes = kernel.BlockSizes.get_default()
    if block_m is not None and (not isinstance(block_m, (int, np.integer)) or block_m < 1):
      raise ValueError(f"block_m={block_m!r} must be an integer >= 1")
    if block_m is not None:
      sizes = kernel.BlockSizes(block_m=int(block_m))
    rows = x2.shape[0]
    padded = -(-max(rows, 1) // sizes.block_m) * sizes.block_m
    x2 = jnp.pad(x2, [(0, padded - rows), (0, 0)])
    y = kernel.block_sparse_matmul(x2, w, sizes, bool(interpret))[:rows]
  return y.reshape(*lead, w.shape[1])
