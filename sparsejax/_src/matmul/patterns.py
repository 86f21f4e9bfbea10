"""Static structured block layouts: block-diagonal, Monarch and flat butterfly.

Each builder returns a host NumPy layout, a bool array over the block grid
``(row_blocks, col_blocks)`` of a ``[K, N]`` weight, ready for
`BlockSparseMatrix.from_dense` or the `layout` of a block-sparse layer.
"""

from __future__ import annotations

import numpy as np

from sparsejax._src import _checks


def _grid(shape) -> tuple[int, int]:
  try:
    rows, cols = shape
  except (TypeError, ValueError):
    raise ValueError(f"shape={shape!r} must be a (row_blocks, col_blocks) pair") from None
  if not (_checks.is_int(rows) and _checks.is_int(cols)):
    raise ValueError(f"shape={shape!r} must be a (row_blocks, col_blocks) pair of integers")
  rows, cols = int(rows), int(cols)
  if rows < 1 or cols < 1:
    raise ValueError(f"shape={(rows, cols)} must be positive")
  return rows, cols


def block_diagonal_layout(shape: tuple[int, int], num_blocks: int) -> np.ndarray:
  """`num_blocks` diagonal groups: block row group g reaches column group g.

  Args:
    shape: (row_blocks, col_blocks), both divisible by `num_blocks`.
    num_blocks: number of diagonal groups; density is ``1 / num_blocks``.

  Returns:
    bool[row_blocks, col_blocks].

  Example:
    >>> sj.matmul.block_diagonal_layout((8, 8), 4)  # four 2x2 groups of blocks
  """
  rows, cols = _grid(shape)
  _checks.static_int("num_blocks", num_blocks)
  if num_blocks < 1 or rows % num_blocks or cols % num_blocks:
    raise ValueError(f"num_blocks={num_blocks} must divide both dims of shape={(rows, cols)}")
  return (np.arange(rows)[:, None] // (rows // num_blocks)
          == np.arange(cols)[None, :] // (cols // num_blocks))


def monarch_layouts(shape: tuple[int, int], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
  """Layouts of the two factors of a Monarch matrix ``W = W1 @ W2``.

  ``W1`` ([row_blocks, row_blocks] blocks) is block-diagonal; ``W2``
  ([row_blocks, col_blocks]) is block-diagonal after a stride permutation of
  its rows (intermediate block i feeds output group ``i % num_blocks``). Each
  factor has density ``1 / num_blocks`` and their product reaches every
  output from every input.

  Reference: Monarch: Expressive Structured Matrices for Efficient and
  Accurate Training. Dao et al., 2022. arXiv:2204.00595.

  Args:
    shape: (row_blocks, col_blocks) of the full weight; row_blocks must be a
      multiple of ``num_blocks ** 2`` and col_blocks of `num_blocks`.
    num_blocks: diagonal groups per factor.

  Returns:
    (layout1 bool[row_blocks, row_blocks], layout2 bool[row_blocks, col_blocks]).

  Example:
    >>> l1, l2 = sj.matmul.monarch_layouts((16, 16), 4)
  """
  rows, cols = _grid(shape)
  _checks.static_int("num_blocks", num_blocks)
  if num_blocks < 1 or rows % (num_blocks * num_blocks) or cols % num_blocks:
    raise ValueError(f"monarch_layouts needs row_blocks a multiple of num_blocks**2 and "
                     f"col_blocks a multiple of num_blocks; got shape={(rows, cols)}, "
                     f"{num_blocks=}")
  first = block_diagonal_layout((rows, rows), num_blocks)
  second = (np.arange(rows)[:, None] % num_blocks
            == np.arange(cols)[None, :] // (cols // num_blocks))
  return first, second


def butterfly_layout(shape: tuple[int, int], max_stride: int | None = None) -> np.ndarray:
  """The flat block butterfly: the union of butterfly factors' supports.

  Block (i, j) is active when ``i == j`` or ``i XOR j`` is a power of two up
  to `max_stride`, on a square grid of ``n = min(rows, cols)`` blocks (a
  power of 2), tiled along the longer dim. Pair it with a low-rank term
  (`BlockSparseLinear(..., low_rank=r)`) for Pixelated Butterfly.

  Reference: Pixelated Butterfly: Simple and Efficient Sparse Training for
  Neural Network Models. Chen, Dao et al., 2022. arXiv:2112.00029.

  Args:
    shape: (row_blocks, col_blocks); the smaller a power of 2 dividing the
      larger.
    max_stride: largest stride, a power of 2 below n (default n // 2:
      ``1 + log2(n)`` blocks per row).

  Returns:
    bool[row_blocks, col_blocks].

  Example:
    >>> sj.matmul.butterfly_layout((16, 16), max_stride=4)  # 4 blocks per row
  """
  rows, cols = _grid(shape)
  n = min(rows, cols)
  if n & (n - 1) or max(rows, cols) % n:
    raise ValueError(f"butterfly_layout needs the smaller of shape={(rows, cols)} a power of 2 "
                     "dividing the larger")
  if max_stride is not None:
    _checks.static_int("max_stride", max_stride)
  max_stride = max(n // 2, 1) if max_stride is None else int(max_stride)
  if max_stride < 1 or max_stride & (max_stride - 1) or (n > 1 and max_stride >= n):
    raise ValueError(f"max_stride={max_stride} must be a power of 2 below {n}")
  i = np.arange(rows)[:, None] % n
  j = np.arange(cols)[None, :] % n
  x = i ^ j
  return (x == 0) | ((x & (x - 1) == 0) & (x <= max_stride))


