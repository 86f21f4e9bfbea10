"""Block-sparse matmul in plain jnp: the dense oracle and the XLA path.

`matmul_reference` multiplies by the dense matrix in float32: obviously
right, the oracle of the tests. `matmul_xla` touches only the active blocks:
the forward maps over block columns, gathering the input tiles of each
column's active blocks into one product; the backward walks the
transposed lists for ``dx = dy @ w.T`` and computes ``dw`` only for the
active blocks (a sampled dense-dense product), in a `jax.custom_vjp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.matmul import format as format_lib

BlockSparseMatrix = format_lib.BlockSparseMatrix


def matmul_reference(x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
  """``x @ w.to_dense()`` accumulated in float32. x: [M, K] -> [M, N]."""
  dense = w.to_dense().astype(jnp.float32)
  return jnp.dot(x.astype(jnp.float32), dense).astype(x.dtype)


def _forward(x, values, row_index):
  # One block column at a time (lax.map): gathering every column's input
  # tiles at once would copy x once per block column.
  m = x.shape[0]
  cols, slots, bk, bn = values.shape
  xb = x.reshape(m, -1, bk)

  def column(args):
    index, blocks = args
    tiles = jnp.take(xb, index, axis=1).reshape(m, slots * bk)
    return jnp.dot(tiles, blocks.reshape(slots * bk, bn), preferred_element_type=jnp.float32)

  y = lax.map(column, (row_index, values))  # [cols, M, bn]
  return y.transpose(1, 0, 2).reshape(m, cols * bn).astype(x.dtype)


def _dx(dy, w: BlockSparseMatrix):
  m = dy.shape[0]
  (bk, bn), per_row = w.block_shape, w.max_per_row
  dyb = dy.reshape(m, -1, bn)

  def row(args):
    col, slot, count = args
    valid = jnp.arange(per_row) < count
    blocks = jnp.where(valid[:, None, None], w.values[col, slot], 0)  # [T, bk, bn]
    tiles = jnp.take(dyb, col, axis=1).reshape(m, per_row * bn)
    blocks = blocks.transpose(0, 2, 1).reshape(per_row * bn, bk)
    return jnp.dot(tiles, blocks, preferred_element_type=jnp.float32)

  dx = lax.map(row, (w.t_col, w.t_slot, w.t_count))  # [rows, M, bk]
  return dx.transpose(1, 0, 2).reshape(m, -1)


def _dvalues(x, dy, w: BlockSparseMatrix):
  m = x.shape[0]
  (bk, bn), slots = w.block_shape, w.max_per_col
  xb = x.reshape(m, -1, bk)
  dy_cols = dy.reshape(m, -1, bn).transpose(1, 0, 2)  # [cols, M, bn]

  def column(args):
    index, dy_col = args
    tiles = jnp.take(xb, index, axis=1).reshape(m, slots * bk)
    dv = lax.dot_general(tiles, dy_col, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return dv.reshape(slots, bk, bn)

  dv = lax.map(column, (w.row_index, dy_cols))
  return jnp.where(w.valid()[:, :, None, None], dv, 0)


@jax.custom_vjp
def matmul_xla(x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
  """``x @ w`` over the active blocks only. x: [M, K] -> [M, N] in x's dtype."""
  values = jnp.where(w.valid()[:, :, None, None], w.values, 0)
  return _forward(x, values, w.row_index)


def _fwd(x, w):
  return matmul_xla(x, w), (x, w)


def _bwd(residuals, dy):
  x, w = residuals
  dx = _dx(dy, w).astype(x.dtype)
  dvalues = _dvalues(x, dy, w).astype(w.values.dtype)
  return dx, w.cotangent(dvalues)


matmul_xla.defvjp(_fwd, _bwd)
