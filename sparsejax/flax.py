"""Flax layers: block-sparse Dense layers for nnx and linen.

``BlockSparseLinear`` (nnx, like ``nnx.Linear``) and ``BlockSparseDense``
(linen, like ``nn.Dense``) hold a dense-shaped kernel. Train them mask-less
with a block-granular method in `sparsejax.sparsify`, then switch to
block-sparse matmuls with `to_block_sparse`; or give them a static block mask
(`sparsejax.block_diagonal_mask`, `butterfly_mask`, ...) to compute only
those blocks from the start.
"""

from sparsejax._src.layers import BlockMask as BlockMask
from sparsejax._src.layers import BlockSparseDense as BlockSparseDense
from sparsejax._src.layers import BlockSparseLinear as BlockSparseLinear
from sparsejax._src.layers import to_block_sparse as to_block_sparse

__all__ = ("BlockMask", "BlockSparseDense", "BlockSparseLinear", "to_block_sparse")
