"""`block_sparse_matmul`: one API, four implementations that agree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src.matmul import format as format_lib
from sparsejax._src.matmul import pallas_gpu
from sparsejax._src.matmul import pallas_tpu
from sparsejax._src.matmul import reference
from sparsejax._src.matmul import xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
_KERNELS = {"pallas_triton": pallas_gpu, "pallas_tpu": pallas_tpu}
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _validate_args(x, w, implementation, block_m):
  format_lib.check_matrix(w)
  if not (hasattr(x, "ndim") and hasattr(x, "dtype")):
    raise ValueError(f"x must be an array [..., K], got {type(x).__name__}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x of shape {x.shape} cannot multiply w of shape {w.shape}: x.shape[-1] "
                     f"must be {w.shape[0]}")
  if x.dtype != w.dtype or x.dtype not in _DTYPES:
    raise ValueError(f"x and w must share one of float32, bfloat16, float16, got x {x.dtype} "
                     f"and w {w.dtype}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS} or None")
  if block_m is not None and (not _checks.is_int(block_m) or block_m < 1):
    raise ValueError(f"block_m={block_m!r} must be an integer >= 1")


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

  Differentiation is reverse mode only (`jax.grad`, `jax.vjp`) except for
  "reference": the other implementations pair their forward with
  hand-written backward kernels that also touch only the active blocks (a
  `jax.custom_vjp`), and JAX derives no forward mode (`jax.jvp`,
  `jax.jacfwd`, `jax.hessian`) from a custom VJP. "reference" is plain jnp
  and supports both.

  Args:
    x: [..., K]; any leading dims, including empty ones (an empty result).
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
    >>> layout = sj.matmul.block_diagonal_layout((8, 8), 4)
    >>> w = sj.matmul.BlockSparseMatrix.from_dense(kernel, layout)  # kernel: [K, N]
    >>> y = sj.matmul.block_sparse_matmul(x, w)  # x: [..., K] -> [..., N]
  """
  _validate_args(x, w, implementation, block_m)
  if implementation is None:
    implementation = default_implementation(w)
  if implementation == "pallas":
    implementation = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if implementation == "reference":
    y = reference.block_sparse_matmul(x2, w)
  elif implementation == "xla":
    y = xla.block_sparse_matmul(x2, w)
  else:
    kernel = _KERNELS[implementation]
    sizes = kernel.BlockSizes.get_default()
    if block_m is not None:
      sizes = dataclasses.replace(sizes, block_m=int(block_m))
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    rows = x2.shape[0]
    padded = -(-rows // sizes.block_m) * sizes.block_m
    x2 = jnp.pad(x2, [(0, padded - rows), (0, 0)])
    y = kernel.block_sparse_matmul(x2, w, sizes, bool(interpret))[:rows]
  return y.reshape(*lead, w.shape[1])
