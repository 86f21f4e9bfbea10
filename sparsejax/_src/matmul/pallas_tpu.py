"""Block-sparse matmul as Pallas TPU kernels (Mosaic, scalar prefetch).

The block lists are prefetched into SMEM and drive the index maps, so each
grid step DMAs one active block: the forward grid is ``(row tile, block
column, slot)`` and accumulates into a float32 scratch; slots past a column's
count map to the previous block (no new DMA) and skip their compute. dX walks
the transposed lists the same way; dW runs ``(block column, slot, row tile)``
and reduces over the row tiles. Blocks are multiples of 128 (the TPU lane
width). Runs on TPU, and on CPU with ``interpret=True``.
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
  """Row tile of the TPU kernels (the block shape is the matrix's).

  Attributes:
    block_m: rows of x per tile, a multiple of 8.
  """

  block_m: int = 128

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _validate_args(x, w: format_lib.BlockSparseMatrix, block_sizes: BlockSizes):
  bk, bn = w.block_shape
  if bk % 128 or bn % 128:
    raise ValueError(f"the TPU kernel needs a block shape of multiples of 128, got {(bk, bn)}")
  if block_sizes.block_m % 8 or x.shape[0] % block_sizes.block_m:
    raise ValueError(f"block_m={block_sizes.block_m} must be a multiple of 8 dividing the rows "
                     f"of x ({x.shape[0]})")


def _accumulate(a_ref, b_ref, acc_ref, out_ref, dims, *, first, active, last):
  """``acc += a @ b`` (in `dims`) where `active`; zeroed at `first`, written out at `last`."""

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(active)
  def _():
    acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], dims,
                                    preferred_element_type=jnp.float32)

  @pl.when(last)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _fwd_kernel(count_ref, index_ref, x_ref, v_ref, y_ref, acc_ref):
  del index_ref
  j, s = pl.program_id(1), pl.program_id(2)
  _accumulate(x_ref, v_ref, acc_ref, y_ref, pallas_common.NN, first=s == 0,
              active=s < count_ref[j], last=s == pl.num_programs(2) - 1)


def _dx_kernel(count_ref, col_ref, slot_ref, dy_ref, v_ref, dx_ref, acc_ref):
  del col_ref, slot_ref
  r, t = pl.program_id(1), pl.program_id(2)
  _accumulate(dy_ref, v_ref, acc_ref, dx_ref, pallas_common.NT, first=t == 0,
              active=t < count_ref[r], last=t == pl.num_programs(2) - 1)


def _dw_kernel(count_ref, index_ref, x_ref, dy_ref, dv_ref, acc_ref):
  del index_ref
  j, s, m = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _accumulate(x_ref, dy_ref, acc_ref, dv_ref, pallas_common.TN, first=m == 0,
              active=s < count_ref[j], last=m == pl.num_programs(2) - 1)


def _compiler_params(interpret: bool):
  """Mosaic settings (None in the interpreter): every grid ends in its reduction axis."""
  if interpret:
    return None
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _clamped(index, count, size):
  """Slot s of a padded list, or its last valid slot once past the count."""
  return lambda j, s: index[j * size + jnp.minimum(s, jnp.maximum(count[j] - 1, 0))]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def block_sparse_matmul(x: jax.Array, w: format_lib.BlockSparseMatrix,
                        block_sizes: BlockSizes = BlockSizes.get_default(),
                        interpret: bool = False) -> jax.Array:
  """``x @ w`` with Pallas TPU kernels; reverse-mode differentiable.

  Args:
    x: [M, K], M a multiple of ``block_sizes.block_m`` (0 gives an empty
      result without a launch).
    w: a `BlockSparseMatrix` of shape [K, N] in x's dtype, blocks multiples
      of 128.
    block_sizes: `BlockSizes`.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    [M, N] in x's dtype.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  _validate_args(x, w, block_sizes)
  m, (cols, slots, bk, bn) = x.shape[0], w.values.shape
  if not m:
    return jnp.zeros((0, cols * bn), x.dtype)
  bm = block_sizes.block_m

  def x_map(i, j, s, count, index):
    return i, _clamped(index, count, slots)(j, s)

  def v_map(i, j, s, count, index):
    del i, index
    return j, jnp.minimum(s, jnp.maximum(count[j] - 1, 0)), 0, 0

  return pl.pallas_call(
      _fwd_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(m // bm, cols, slots),
          in_specs=[pl.BlockSpec((bm, bk), x_map),
                    pl.BlockSpec((None, None, bk, bn), v_map)],
          out_specs=pl.BlockSpec((bm, bn), lambda i, j, s, count, index: (i, j)),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((m, cols * bn), x.dtype),
      compiler_params=_compiler_params(interpret),
      interpret=interpret, name="block_sparse_matmul_fwd_tpu",
  )(w.count, w.row_index.reshape(-1), x, w.values)


def _fwd(x, w, block_sizes, interpret):
  return block_sparse_matmul(x, w, block_sizes, interpret), (x, w)


def _bwd(block_sizes, interpret, residuals, dy):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  x, w = residuals
  (m, k), (rows, cols), (bk, bn) = x.shape, w.grid, w.block_shape
  if not m:
    return jnp.zeros_like(x), w.cotangent(jnp.zeros_like(w.values))
  slots, per_row, bm = w.max_per_col, w.max_per_row, block_sizes.block_m
  params = _compiler_params(interpret)
  dy = dy.astype(x.dtype)

  def t_of(r, t, count):
    return r * per_row + jnp.minimum(t, jnp.maximum(count[r] - 1, 0))

  def dy_map(i, r, t, count, col, slot):
    del slot
    return i, col[t_of(r, t, count)]

  def vt_map(i, r, t, count, col, slot):
    del i
    return col[t_of(r, t, count)], slot[t_of(r, t, count)], 0, 0

  dx = pl.pallas_call(
      _dx_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(m // bm, rows, per_row),
          in_specs=[pl.BlockSpec((bm, bn), dy_map),
                    pl.BlockSpec((None, None, bk, bn), vt_map)],
          out_specs=pl.BlockSpec((bm, bk), lambda i, r, t, count, col, slot: (i, r)),
          scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((m, k), x.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_matmul_dx_tpu",
  )(w.t_count, w.t_col.reshape(-1), w.t_slot.reshape(-1), dy, w.values)

  def x_map(j, s, i, count, index):
    # Padded slots stay on one block so the row tiles are not re-fetched.
    i = jnp.where(s < count[j], i, 0)
    return i, _clamped(index, count, slots)(j, s)

  def dy_map_w(j, s, i, count, index):
    del index
    return jnp.where(s < count[j], i, 0), j

  dvalues = pl.pallas_call(
      _dw_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(cols, slots, m // bm),
          in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((bm, bn), dy_map_w)],
          out_specs=pl.BlockSpec((None, None, bk, bn), lambda j, s, i, count, index: (j, s, 0, 0)),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(w.values.shape, w.values.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_matmul_dw_tpu",
  )(w.count, w.row_index.reshape(-1), x, dy)
  return dx, w.cotangent(dvalues)


block_sparse_matmul.defvjp(_fwd, _bwd)
