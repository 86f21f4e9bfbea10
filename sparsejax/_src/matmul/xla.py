"""Block-sparse matmul in jnp over the active blocks only (the XLA path).

The forward maps over block columns, gathering the input tiles of each
column's active blocks into one product. The backward walks the transposed
lists for ``dx = dy @ w.T`` and computes ``dw`` only for the active blocks
(a sampled dense-dense product), in a `jax.custom_vjp`: differentiating the
forward's gathers would scatter-add into a dense ``dx`` per block column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src import pallas_common
from sparsejax._src.matmul import format as format_lib


def _dot(a, b, dims=pallas_common.NN):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _y(x, values, row_index):
  # One block column at a time (lax.map): gathering every column's input
  # tiles at once would copy x once per block column.
  (m, k), (cols, slots, bk, bn) = x.shape, values.shape
  xb = x.reshape(m, k // bk, bk)

  def column(args):
    index, blocks = args
    tiles = jnp.take(xb, index, axis=1).reshape(m, slots * bk)
    return _dot(tiles, blocks.reshape(slots * bk, bn))

  y = lax.map(column, (row_index, values))  # [cols, M, bn]
  return y.transpose(1, 0, 2).reshape(m, cols * bn)


def _dx(dy, w: format_lib.BlockSparseMatrix):
  (m, k), (bk, bn), per_row = (dy.shape[0], w.shape[0]), w.block_shape, w.max_per_row
  dyb = dy.reshape(m, w.grid[1], bn)

  def row(args):
    col, slot, count = args
    valid = jnp.arange(per_row) < count
    blocks = jnp.where(valid[:, None, None], w.values[col, slot], 0)  # [T, bk, bn]
    tiles = jnp.take(dyb, col, axis=1).reshape(m, per_row * bn)
    return _dot(tiles, blocks.transpose(0, 2, 1).reshape(per_row * bn, bk))

  dx = lax.map(row, (w.t_col, w.t_slot, w.t_count))  # [rows, M, bk]
  return dx.transpose(1, 0, 2).reshape(m, k)


def _dvalues(x, dy, w: format_lib.BlockSparseMatrix):
  (m, k), (bk, bn), slots = x.shape, w.block_shape, w.max_per_col
  xb = x.reshape(m, k // bk, bk)
  dy_cols = dy.reshape(m, w.grid[1], bn).transpose(1, 0, 2)  # [cols, M, bn]

  def column(args):
    index, dy_col = args
    tiles = jnp.take(xb, index, axis=1).reshape(m, slots * bk)
    return _dot(tiles, dy_col, pallas_common.TN).reshape(slots, bk, bn)

  dv = lax.map(column, (w.row_index, dy_cols))
  return jnp.where(w.valid()[:, :, None, None], dv, 0)


@jax.custom_vjp
@jax.jit
def block_sparse_matmul(x: jax.Array, w: format_lib.BlockSparseMatrix) -> jax.Array:
  """``x @ w`` over the active blocks only. x: [M, K] -> [M, N] in x's dtype."""
  values = jnp.where(w.valid()[:, :, None, None], w.values, 0)
  return _y(x, values, w.row_index).astype(x.dtype)


def _fwd(x, w):
  return block_sparse_matmul(x, w), (x, w)


def _bwd(residuals, dy):
  x, w = residuals
  dx = _dx(dy, w).astype(x.dtype)
  dvalues = _dvalues(x, dy, w).astype(w.values.dtype)
  return dx, w.cotangent(dvalues)


block_sparse_matmul.defvjp(_fwd, _bwd)
