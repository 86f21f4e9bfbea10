"""Flax layers: block-sparse Dense layers for nnx and linen.

`BlockSparseLinear` (nnx, like ``nnx.Linear``) and `BlockSparseDense` (linen,
like ``nn.Dense``) hold a dense-shaped kernel. Train them layout-less with a
block-granular method in `sparsejax.sparsify`, then switch to block-sparse
matmuls with `to_block_sparse`; or give them a static layout
(`sparsejax.matmul.block_diagonal_layout`, `butterfly_layout`, ...) to compute
only those blocks from the start. This is the only module of sparsejax that
imports flax.

Example:
  >>> from flax import nnx
  >>> import sparsejax as sj
  >>> layer = sj.nn.BlockSparseLinear(
  ...     256, 256, block_shape=(32, 32), layout=sj.matmul.butterfly_layout((8, 8)),
  ...     rngs=nnx.Rngs(0))
  >>> y = layer(x)            # only the butterfly's blocks are computed
  >>> layer.layout[...]       # the BlockLayout variable, bool[8, 8]
"""

from sparsejax._src.layers import BlockLayout as BlockLayout
from sparsejax._src.layers import BlockSparseDense as BlockSparseDense
from sparsejax._src.layers import BlockSparseLinear as BlockSparseLinear
from sparsejax._src.activations.layers import InputThreshold as InputThreshold
from sparsejax._src.activations.layers import SparseInputLinear as SparseInputLinear
from sparsejax._src.activations.layers import sparsify_inputs as sparsify_inputs
from sparsejax._src.layers import to_block_sparse as to_block_sparse

__all__ = ("BlockLayout", "BlockSparseDense", "BlockSparseLinear", "InputThreshold",
           "SparseInputLinear", "sparsify_inputs", "to_block_sparse")
