"""Sparse matmuls: block-sparse (`BlockSparseMatrix`).

A block-sparse weight is a dense ``[K, N]`` matrix and a *layout*, a bool
array with one entry per ``[bk, bn]`` block; `block_sparse_matmul` touches
only the active blocks, forward and backward, in jnp ("xla") or Pallas
kernels for GPU and TPU. Layouts come from static patterns
(`block_diagonal_layout`, `butterfly_layout`, `monarch_layouts`) or from a
trained block-granular mask (`block_layout`).

Example:
  >>> import sparsejax as sj
  >>> layout = sj.matmul.block_diagonal_layout((8, 8), 4)        # bool[8, 8]
  >>> w = sj.matmul.BlockSparseMatrix.from_dense(kernel, layout)  # kernel: [256, 256]
  >>> y = sj.matmul.block_sparse_matmul(x, w)                     # x: [..., 256]
"""

from sparsejax._src.matmul.api import IMPLEMENTATIONS as IMPLEMENTATIONS
from sparsejax._src.matmul.api import block_sparse_matmul as block_sparse_matmul
from sparsejax._src.matmul.format import BlockSparseMatrix as BlockSparseMatrix
from sparsejax._src.matmul.format import block_layout as block_layout
from sparsejax._src.matmul.patterns import block_diagonal_layout as block_diagonal_layout
from sparsejax._src.matmul.patterns import butterfly_layout as butterfly_layout
from sparsejax._src.matmul.patterns import monarch_layouts as monarch_layouts

__all__ = (
    "IMPLEMENTATIONS",
    "BlockSparseMatrix",
    "block_diagonal_layout",
    "block_layout",
    "block_sparse_matmul",
    "butterfly_layout",
    "monarch_layouts",
)
