"""Block-sparse matmul as Pallas kernels for GPUs (Triton backend).

Forward: one program per (row tile of x, block column of w) adds up
``x[tile, rows of block] @ block`` over the column's active blocks. Backward:
a dX kernel walks the transposed lists (the active blocks of each block row)
and a dW kernel runs one program per slot, reducing ``x.T @ dy`` over the
row tiles for active slots only and writing zeros for padded ones. Runs on
Ampere and newer through the Triton backend; on CPU with ``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparsejax._src import pallas_common
from sparsejax._src.matmul import format as format_lib


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Row tile and launch settings of the GPU kernels.

  The block shape is the matrix's; these choose how x's rows are tiled and
  how Triton launches the programs.

  Attributes:
    block_m: rows of x per program (a power of 2 >= 16).
    num_warps: warps per program.
    num_stages: software pipelining stages.
  """

  block_m: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()

  def compiler_params(self, interpret: bool):
    """Triton launch settings (None in the interpreter)."""
    if interpret:
      return None
    return pallas_common.triton_params(self.num_warps, self.num_stages)


def _validate_args(x, w: format_lib.BlockSparseMatrix, block_sizes: BlockSizes):
  for name, size in [("bk", w.block_shape[0]), ("bn", w.block_shape[1]),
                     ("block_m", block_sizes.block_m)]:
    if size < 16 or size & (size - 1):
      raise ValueError(f"the GPU kernel needs {name} a power of 2 >= 16, got {size}")
  if x.shape[0] % block_sizes.block_m:
    raise ValueError(f"rows of x ({x.shape[0]}) must be a multiple of "
                     f"block_m={block_sizes.block_m}")


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _fwd_kernel(count_ref, index_ref, x_ref, v_ref, y_ref, *, bk):
  def body(s, acc):
    rows = pl.ds(index_ref[s] * bk, bk)
    return acc + _dot(x_ref[:, rows], v_ref[s], pallas_common.NN)

  acc = lax.fori_loop(0, count_ref[0], body, jnp.zeros(y_ref.shape, jnp.float32))
  y_ref[...] = acc.astype(y_ref.dtype)


def _dx_kernel(count_ref, col_ref, slot_ref, dy_ref, v_ref, dx_ref, *, bn):
  def body(t, acc):
    j = col_ref[t]
    return acc + _dot(dy_ref[:, pl.ds(j * bn, bn)], v_ref[j, slot_ref[t]], pallas_common.NT)

  acc = lax.fori_loop(0, count_ref[0], body, jnp.zeros(dx_ref.shape, jnp.float32))
  dx_ref[...] = acc.astype(dx_ref.dtype)


def _dw_kernel(count_ref, index_ref, x_ref, dy_ref, dv_ref, *, bk, block_m):
  s = pl.program_id(1)
  rows = pl.ds(index_ref[s] * bk, bk)
  tiles = jnp.where(s < count_ref[0], x_ref.shape[0] // block_m, 0)

  def body(t, acc):
    m = pl.ds(t * block_m, block_m)
    return acc + _dot(x_ref[m, rows], dy_ref[m, :], pallas_common.TN)

  acc = lax.fori_loop(0, tiles, body, jnp.zeros(dv_ref.shape, jnp.float32))
  dv_ref[...] = acc.astype(dv_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def block_sparse_matmul(x: jax.Array, w: format_lib.BlockSparseMatrix,
                        block_sizes: BlockSizes = BlockSizes.get_default(),
                        interpret: bool = False) -> jax.Array:
  """``x @ w`` with Pallas GPU kernels (Triton backend); reverse-mode differentiable.

  Args:
    x: [M, K], M a multiple of ``block_sizes.block_m`` (0 gives an empty
      result without a launch).
    w: a `BlockSparseMatrix` of shape [K, N] in x's dtype.
    block_sizes: `BlockSizes` launch settings.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    [M, N] in x's dtype.
  """
  _validate_args(x, w, block_sizes)
  (m, k), (cols, slots, bk, bn) = x.shape, w.values.shape
  if not m:
    return jnp.zeros((0, cols * bn), x.dtype)
  bm = block_sizes.block_m
  return pl.pallas_call(
      functools.partial(_fwd_kernel, bk=bk),
      grid=(m // bm, cols),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (j,)),
                pl.BlockSpec((None, slots), lambda i, j: (j, 0)),
                pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((None, slots, bk, bn), lambda i, j: (j, 0, 0, 0))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, cols * bn), x.dtype),
      compiler_params=block_sizes.compiler_params(interpret),
      interpret=interpret, name="block_sparse_matmul_fwd",
  )(w.count, w.row_index, x, w.values)


def _fwd(x, w, block_sizes, interpret):
  return block_sparse_matmul(x, w, block_sizes, interpret), (x, w)


def _bwd(block_sizes, interpret, residuals, dy):
  x, w = residuals
  (m, k), (rows, cols), (bk, bn) = x.shape, w.grid, w.block_shape
  if not m:
    return jnp.zeros_like(x), w.cotangent(jnp.zeros_like(w.values))
  slots, per_row, bm = w.max_per_col, w.max_per_row, block_sizes.block_m
  params = block_sizes.compiler_params(interpret)
  dy = dy.astype(x.dtype)
  dx = pl.pallas_call(
      functools.partial(_dx_kernel, bn=bn),
      grid=(m // bm, rows),
      in_specs=[pl.BlockSpec((1,), lambda i, r: (r,)),
                pl.BlockSpec((None, per_row), lambda i, r: (r, 0)),
                pl.BlockSpec((None, per_row), lambda i, r: (r, 0)),
                pl.BlockSpec((bm, cols * bn), lambda i, r: (i, 0)),
                pl.BlockSpec(w.values.shape, lambda i, r: (0, 0, 0, 0))],
      out_specs=pl.BlockSpec((bm, bk), lambda i, r: (i, r)),
      out_shape=jax.ShapeDtypeStruct((m, k), x.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_matmul_dx",
  )(w.t_count, w.t_col, w.t_slot, dy, w.values)
  dvalues = pl.pallas_call(
      functools.partial(_dw_kernel, bk=bk, block_m=bm),
      grid=(cols, slots),
      in_specs=[pl.BlockSpec((1,), lambda j, s: (j,)),
                pl.BlockSpec((None, slots), lambda j, s: (j, 0)),
                pl.BlockSpec((m, k), lambda j, s: (0, 0)),
                pl.BlockSpec((m, bn), lambda j, s: (0, j))],
      out_specs=pl.BlockSpec((None, None, bk, bn), lambda j, s: (j, s, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(w.values.shape, w.values.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_matmul_dw",
  )(w.count, w.row_index, x, dy)
  return dx, w.cotangent(dvalues)


block_sparse_matmul.defvjp(_fwd, _bwd)
