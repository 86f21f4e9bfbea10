"""Sparse matmuls: block-sparse (`BlockSparseMatrix`) and N:M (`NMWeights`).

A block-sparse weight is a dense ``[K, N]`` matrix and a *layout*, a bool
array with one entry per ``[bk, bn]`` block; `block_sparse_matmul` touches
only the active blocks, forward and backward, in jnp ("xla") or Pallas
kernels for GPU and TPU. Layouts come from static patterns
(`block_diagonal_layout`, `butterfly_layout`, `monarch_layouts`) or from a
trained block-granular mask (`block_layout`). An N:M weight keeps `n` of
every `m` consecutive inputs; `compress_n_m` stores it compactly and
`n_m_matmul` multiplies with it. `sparse_input_matmul` multiplies a sparse
input (decode-time activations) by a dense weight, reading only the weight
rows at nonzero inputs.

Example:
  >>> import sparsejax as sj
  >>> layout = sj.matmul.block_diagonal_layout((8, 8), 4)        # bool[8, 8]
  >>> w = sj.matmul.BlockSparseMatrix.from_dense(kernel, layout)  # kernel: [256, 256]
  >>> y = sj.matmul.block_sparse_matmul(x, w)                     # x: [..., 256]
  >>> c = sj.matmul.compress_n_m(kernel, 2, 4)                    # 2:4 along the inputs
  >>> y = sj.matmul.n_m_matmul(x, c)
"""

from sparsejax._src.matmul.api import IMPLEMENTATIONS as IMPLEMENTATIONS
from sparsejax._src.matmul.api import block_sparse_matmul as block_sparse_matmul
from sparsejax._src.matmul.format import BlockSparseMatrix as BlockSparseMatrix
from sparsejax._src.matmul.format import block_layout as block_layout
from sparsejax._src.matmul.n_m_format import NMWeights as NMWeights
from sparsejax._src.matmul.n_m_format import compress_n_m as compress_n_m
from sparsejax._src.matmul.n_m_format import decompress_n_m as decompress_n_m
from sparsejax._src.matmul.n_m_format import n_m_matmul as n_m_matmul
from sparsejax._src.matmul.patterns import block_diagonal_layout as block_diagonal_layout
from sparsejax._src.matmul.patterns import butterfly_layout as butterfly_layout
from sparsejax._src.matmul.patterns import monarch_layouts as monarch_layouts
from sparsejax._src.matmul.sparse_input import sparse_input_matmul as sparse_input_matmul

__all__ = (
    "IMPLEMENTATIONS",
    "BlockSparseMatrix",
    "NMWeights",
    "block_diagonal_layout",
    "block_layout",
    "block_sparse_matmul",
    "butterfly_layout",
    "compress_n_m",
    "decompress_n_m",
    "monarch_layouts",
    "n_m_matmul",
    "sparse_input_matmul",
)
