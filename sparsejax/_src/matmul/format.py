"""`BlockSparseMatrix`: a weight stored as its active blocks; block layouts.

A ``[K, N]`` matrix tiled into ``[bk, bn]`` blocks is a grid of
``K // bk`` block rows and ``N // bn`` block columns. Its *layout* is a bool
array over that grid, True where a block is active. For each block column
(each output tile of ``x @ w``) the format keeps the row indices and values
of its active blocks, padded to a fixed number of slots, and for each block
row the transposed lists, which the ``dy @ w.T`` pass walks. All fields are
arrays whose shapes carry the sizes, so a new layout with the same slot
counts changes data, not shapes: nothing recompiles, and `from_dense` also
runs on traced layouts inside `jax.jit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import granularity


class BlockSparseMatrix(NamedTuple):
  """A ``[K, N]`` matrix as its active ``[bk, bn]`` blocks (a pytree).

  Lists are sorted ascending and padded by repeating their last entry (0 for
  an empty list), so a kernel that prefetches the next block re-reads the
  same one; padded slots hold zeros and are ignored by every implementation.

  Attributes:
    values: [col_blocks, max_per_col, bk, bn]: the active blocks of each block
      column. The only differentiable field.
    row_index: int32[col_blocks, max_per_col]: the block row of each slot.
    count: int32[col_blocks]: active blocks per block column.
    t_col: int32[row_blocks, max_per_row]: the active block columns of each
      block row (the transposed lists, for ``dy @ w.T``).
    t_slot: int32[row_blocks, max_per_row]: the slot of each of those blocks
      in its column's list.
    t_count: int32[row_blocks]: active blocks per block row.

  Example:
    >>> w = sj.matmul.BlockSparseMatrix.from_dense(kernel, layout)  # host layout
    >>> y = sj.matmul.block_sparse_matmul(x, w)
    >>> w.to_dense()  # the [K, N] matrix, zeros outside the active blocks
  """

  values: jax.Array
  row_index: jax.Array
  count: jax.Array
  t_col: jax.Array
  t_slot: jax.Array
  t_count: jax.Array

  @property
  def block_shape(self) -> tuple[int, int]:
    return tuple(self.values.shape[2:])

  @property
  def grid(self) -> tuple[int, int]:
    """(row_blocks, col_blocks)."""
    return self.t_count.shape[0], self.count.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    (bk, bn), (rows, cols) = self.block_shape, self.grid
    return rows * bk, cols * bn

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def max_per_col(self) -> int:
    return self.values.shape[1]

  @property
  def max_per_row(self) -> int:
    return self.t_col.shape[1]

  def valid(self) -> jax.Array:
    """bool[col_blocks, max_per_col]: which slots hold an active block."""
    return jnp.arange(self.max_per_col)[None, :] < self.count[:, None]

  def layout(self) -> jax.Array:
    """bool[row_blocks, col_blocks]: True where a block is active."""
    rows, cols = self.grid
    col = jnp.broadcast_to(jnp.arange(cols)[:, None], self.row_index.shape)
    return jnp.zeros((rows, cols), bool).at[self.row_index, col].max(self.valid())

  def cotangent(self, values: jax.Array) -> BlockSparseMatrix:
    """A gradient of this matrix: `values`, and no gradient for the indices."""
    return self._replace(values=values, row_index=None, count=None, t_col=None, t_slot=None,
                         t_count=None)

  def to_dense(self) -> jax.Array:
    """The ``[K, N]`` matrix: the active blocks in place, zeros elsewhere."""
    (bk, bn), (rows, cols) = self.block_shape, self.grid
    col = jnp.broadcast_to(jnp.arange(cols)[:, None], self.row_index.shape)
    values = jnp.where(self.valid()[:, :, None, None], self.values, 0)
    blocks = jnp.zeros((rows, cols, bk, bn), self.dtype).at[self.row_index, col].add(values)
    return blocks.transpose(0, 2, 1, 3).reshape(rows * bk, cols * bn)

  @classmethod
  def from_dense(cls, w: jax.Array, layout: jax.Array | np.ndarray | None = None, *,
                 block_shape: tuple[int, int] | None = None, max_per_col: int | None = None,
                 max_per_row: int | None = None) -> BlockSparseMatrix:
    """Keeps the blocks of `w` that `layout` marks active.

    Args:
      w: [K, N] dense matrix.
      layout: bool[K // bk, N // bn]; None means the blocks of `w` that hold
        a nonzero (`w` must then be concrete, e.g. a trained kernel).
      block_shape: (bk, bn); needed only when `layout` is None.
      max_per_col: slots per block column. Default: the largest column count
        of a concrete layout. Required for a traced layout; a concrete
        layout that needs more slots raises; a traced one keeps, in each
        column and row, the first blocks that fit.
      max_per_row: slots per block row of the transposed lists (same rules).

    Returns:
      A `BlockSparseMatrix` with ``to_dense() == w * expand(layout)``.

    Raises:
      ValueError: if the shapes do not tile, the layout is not boolean, or a
        concrete layout needs more slots than given.
    """
    if not isinstance(w, jax.Array):
      w = jnp.asarray(w)
    if w.ndim != 2:
      raise ValueError(f"w must be a [K, N] matrix, got shape {w.shape}")
    if layout is None:
      if block_shape is None:
        raise ValueError("pass layout, or block_shape to use the nonzero blocks of w")
      if not _checks.is_concrete(w):
        raise ValueError("layout=None reads the nonzero blocks of w, which needs a concrete w; "
                         "pass layout inside jit")
      layout = nonzero_layout(w, block_shape)
    if not isinstance(layout, (jax.Array, np.ndarray)):
      layout = np.asarray(layout)
    rows, cols = layout.shape if layout.ndim == 2 else (0, 0)
    if layout.ndim != 2 or layout.dtype != bool or rows < 1 or cols < 1:
      raise ValueError(f"layout must be a 2-d bool array with at least one block, got "
                       f"{layout.dtype} of shape {layout.shape}")
    for name, value in [("max_per_col", max_per_col), ("max_per_row", max_per_row)]:
      if value is not None and not _checks.is_int(value):
        raise ValueError(f"{name}={value!r} must be an integer")
    if w.shape[0] % rows or w.shape[1] % cols:
      raise ValueError(f"layout of shape {layout.shape} does not tile w of shape {w.shape}")
    bk, bn = w.shape[0] // rows, w.shape[1] // cols
    if block_shape is not None and tuple(block_shape) != (bk, bn):
      raise ValueError(f"block_shape={tuple(block_shape)} but a layout of shape "
                       f"{layout.shape} tiles w of shape {w.shape} into {(bk, bn)} blocks")
    concrete = _checks.is_concrete(layout)
    if concrete:
      host = np.asarray(layout)
      need_col, need_row = int(host.sum(0).max()), int(host.sum(1).max())
      for name, given, need, axis in [("max_per_col", max_per_col, need_col, "column"),
                                      ("max_per_row", max_per_row, need_row, "row")]:
        if given is not None and given < need:
          raise ValueError(f"{name}={given} but a block {axis} of the layout has {need} "
                           "active blocks")
      default_col, default_row = slot_counts(host)
      max_per_col = default_col if max_per_col is None else max_per_col
      max_per_row = default_row if max_per_row is None else max_per_row
    elif max_per_col is None or max_per_row is None:
      raise ValueError("a traced layout needs max_per_col and max_per_row (the slot counts fix "
                       "the shapes under jit)")
    for name, value, limit in [("max_per_col", max_per_col, rows), ("max_per_row", max_per_row,
                                                                    cols)]:
      if not 1 <= int(value) <= limit:
        raise ValueError(f"{name}={value} must be in [1, {limit}]")
    max_per_col, max_per_row = int(max_per_col), int(max_per_row)
    if concrete:  # the lists of a host layout are constants, not ops in every call's program
      with jax.ensure_compile_time_eval():
        lists = _index_lists(jnp.asarray(layout), max_per_col, max_per_row)
    else:
      lists = _index_lists(layout, max_per_col, max_per_row)
    row_index, count, t_col, t_slot, t_count = lists
    blocks = w.reshape(rows, bk, cols, bn).transpose(2, 0, 1, 3)  # [cols, rows, bk, bn]
    values = jnp.take_along_axis(blocks, row_index[:, :, None, None], axis=1)
    valid = jnp.arange(max_per_col)[None, :] < count[:, None]
    values = jnp.where(valid[:, :, None, None], values, 0).astype(w.dtype)
    return cls(values, row_index, count, t_col, t_slot, t_count)


def check_matrix(w: BlockSparseMatrix) -> None:
  """Raises ValueError unless `w`'s fields have the shapes and ranges of one matrix."""
  if not isinstance(w, BlockSparseMatrix):
    raise ValueError(f"w must be a sj.matmul.BlockSparseMatrix (BlockSparseMatrix.from_dense), "
                     f"got {type(w).__name__}")
  if w.values.ndim != 4:
    raise ValueError(f"w.values must be [col_blocks, max_per_col, bk, bn], got shape "
                     f"{w.values.shape}")
  cols, slots = w.values.shape[:2]
  if w.t_col.ndim != 2:
    raise ValueError(f"w.t_col must be a 2-d integer array [row_blocks, max_per_row], got "
                     f"shape {w.t_col.shape}")
  rows, per_row = w.t_col.shape
  fields = [("row_index", (cols, slots), rows), ("count", (cols,), slots + 1),
            ("t_col", (rows, per_row), cols), ("t_slot", (rows, per_row), slots),
            ("t_count", (rows,), per_row + 1)]
  for name, shape, limit in fields:
    field = getattr(w, name)
    if field.shape != shape or not jnp.issubdtype(field.dtype, jnp.integer):
      raise ValueError(f"w.{name} must be an integer array of shape {shape}, got "
                       f"{field.dtype} of shape {field.shape}")
    if _checks.is_concrete(field):
      host = np.asarray(field)
      if host.size and (host.min() < 0 or host.max() >= limit):
        raise ValueError(f"w.{name} has entries outside [0, {limit}): min {host.min()}, "
                         f"max {host.max()}")


def block_layout(mask: jax.Array, block_shape: tuple[int, ...]) -> jax.Array:
  """The layout of a block-structured mask: True where a tile is on.

  Args:
    mask: a bool mask whose tiles are all on or all off (from
      ``sj.get_masks`` of a method with ``granularity=sj.Block(block_shape)``).
    block_shape: the tile shape it was made with; it tiles the trailing dims
      of `mask` (leading dims by 1).

  Returns:
    bool array of shape ``mask.shape // block_shape``, ready for
    `BlockSparseMatrix.from_dense` or the `layout` of a block-sparse layer.

  Raises:
    ValueError: if `block_shape` does not divide the mask or a tile is partly
      on (checked on a concrete mask only).

  Example:
    >>> layout = sj.matmul.block_layout(masks["dense"]["kernel"], (16, 16))
  """
  if not isinstance(block_shape, (tuple, list)):
    block_shape = np.asarray(block_shape).reshape(-1).tolist()
  block = granularity.Block(tuple(block_shape))
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask dtype {mask.dtype} must be bool (a mask from sj.get_masks or "
                     "sj.masks_from_scores)")
  tile = (1,) * (mask.ndim - len(block.block_shape)) + block.block_shape
  if len(tile) > mask.ndim or any(d % b for d, b in zip(mask.shape, tile)):
    raise ValueError(f"block_shape={block.block_shape} does not divide the mask of shape "
                     f"{tuple(mask.shape)}")
  any_on = block.pool(mask, "max")
  if _checks.is_concrete(mask) and bool(jnp.any(any_on != ~block.pool(~mask, "max"))):
    raise ValueError(f"mask is not block-structured for block_shape={block.block_shape}: "
                     "some tiles are partly on")
  return any_on


def nonzero_layout(w, block_shape) -> np.ndarray:
  """bool[K // bk, N // bn]: the blocks of a concrete `w` that hold a nonzero."""
  bk, bn = check_block_shape(w.shape, block_shape)
  blocks = np.asarray(w).reshape(w.shape[0] // bk, bk, w.shape[1] // bn, bn)
  return np.any(blocks != 0, axis=(1, 3))


def slot_counts(layout: np.ndarray) -> tuple[int, int]:
  """Default (max_per_col, max_per_row) of a host layout: its largest counts."""
  return max(int(layout.sum(0).max()), 1), max(int(layout.sum(1).max()), 1)


def check_block_shape(shape: tuple[int, int], block_shape) -> tuple[int, int]:
  """`block_shape` as a pair of ints that divides a [K, N] `shape`, or a ValueError."""
  try:
    bk, bn = (int(b) for b in block_shape)
  except (TypeError, ValueError):
    raise ValueError(f"block_shape={block_shape!r} must be a pair of integers") from None
  if bk < 1 or bn < 1 or shape[0] % bk or shape[1] % bn:
    raise ValueError(f"block_shape={(bk, bn)} does not divide w of shape {tuple(shape)}")
  return bk, bn


def _index_lists(layout, max_per_col, max_per_row):
  """(row_index, count, t_col, t_slot, t_count) of a bool [rows, cols] layout."""
  # A traced layout that overflows its slots keeps the blocks that fit both
  # lists (a concrete one was checked), so forward and backward agree.
  slot_of = jnp.cumsum(layout, axis=0, dtype=jnp.int32) - 1  # slot in its column
  fits = (slot_of < max_per_col) & (jnp.cumsum(layout, axis=1) <= max_per_row)
  layout = layout & fits
  slot_of = jnp.cumsum(layout, axis=0, dtype=jnp.int32) - 1
  row_index, count = _lists(layout.T, max_per_col)  # per column
  t_col, t_count = _lists(layout, max_per_row)  # per row
  t_slot = jnp.clip(jnp.take_along_axis(slot_of, t_col, axis=1), 0, max_per_col - 1)
  return row_index, count, t_col, t_slot, t_count


def _lists(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """For each row of a bool [n, m] mask, its True columns ascending, padded."""
  count = jnp.sum(mask, axis=1, dtype=jnp.int32)
  order = jnp.argsort(~mask, axis=1, stable=True)[:, :size].astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.clip(count - 1, 0, size - 1)[:, None], axis=1)
  slots = jnp.arange(size)[None, :]
  index = jnp.where(slots < count[:, None], order, jnp.where(count[:, None] > 0, last, 0))
  return index, jnp.minimum(count, size)
