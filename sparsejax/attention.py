"""Block-sparse attention: masks, layouts and one API over four implementations.

Example:
  >>> from sparsejax import attention as sja
  >>> mask = sja.CausalMask((T, T)) & sja.LocalMask((T, T), window=(1024, 0))
  >>> layout = sja.make_layout(mask, num_heads=H, block_q=128, block_kv=128)
  >>> out = sja.block_sparse_attention(q, k, v, layout, implementation="pallas")
  >>> docs = sja.block_sparse_attention(q, k, v, layout, q_segment_ids=ids,
  ...                                   score_mod=lambda s, b, h, i, j: 30 * jnp.tanh(s / 30))
"""

from sparsejax._src.attention.api import IMPLEMENTATIONS as IMPLEMENTATIONS
from sparsejax._src.attention.api import block_sparse_attention as block_sparse_attention
from sparsejax._src.attention.decode import combine as combine
from sparsejax._src.attention.decode import decode_attention as decode_attention
from sparsejax._src.attention.layout import Layout as Layout
from sparsejax._src.attention.layout import dense_mask as dense_mask
from sparsejax._src.attention.layout import make_layout as make_layout
from sparsejax._src.attention.layout import plot_layout as plot_layout
from sparsejax._src.attention.layout import topk_layout as topk_layout
from sparsejax._src.attention.masks import AShapeMask as AShapeMask
from sparsejax._src.attention.masks import BigBirdMask as BigBirdMask
from sparsejax._src.attention.masks import CausalMask as CausalMask
from sparsejax._src.attention.masks import ChunkedCausalMask as ChunkedCausalMask
from sparsejax._src.attention.masks import FullMask as FullMask
from sparsejax._src.attention.masks import LocalMask as LocalMask
from sparsejax._src.attention.masks import Mask as Mask
from sparsejax._src.attention.masks import MultiHeadMask as MultiHeadMask
from sparsejax._src.attention.masks import NumpyMask as NumpyMask
from sparsejax._src.attention.masks import StridedShardMask as StridedShardMask
from sparsejax._src.attention.masks import VerticalSlashMask as VerticalSlashMask
from sparsejax._src.attention.segments import segment_layout as segment_layout

__all__ = (
    "AShapeMask",
    "BigBirdMask",
    "CausalMask",
    "ChunkedCausalMask",
    "FullMask",
    "IMPLEMENTATIONS",
    "Layout",
    "LocalMask",
    "Mask",
    "MultiHeadMask",
    "NumpyMask",
    "StridedShardMask",
    "VerticalSlashMask",
    "block_sparse_attention",
    "combine",
    "decode_attention",
    "dense_mask",
    "make_layout",
    "plot_layout",
    "segment_layout",
    "topk_layout",
)
