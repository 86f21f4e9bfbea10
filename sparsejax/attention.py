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
from sparsejax._src.attention.estimate import estimate_vertical_slash as estimate_vertical_slash
from sparsejax._src.attention.kv_cache import KVCache as KVCache
from sparsejax._src.attention.kv_cache import append as append
from sparsejax._src.attention.kv_cache import init_cache as init_cache
from sparsejax._src.attention.kv_cache import kv_bytes as kv_bytes
from sparsejax._src.attention.kv_cache import kv_needed as kv_needed
from sparsejax._src.attention.kv_cache import page_recall as page_recall
from sparsejax._src.attention.kv_cache import present_pages as present_pages
from sparsejax._src.attention.kv_cache import select_pages as select_pages
from sparsejax._src.attention.estimate import layout_recall as layout_recall
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
    "KVCache",
    "Layout",
    "LocalMask",
    "Mask",
    "MultiHeadMask",
    "NumpyMask",
    "StridedShardMask",
    "VerticalSlashMask",
    "append",
    "block_sparse_attention",
    "combine",
    "decode_attention",
    "dense_mask",
    "estimate_vertical_slash",
    "init_cache",
    "kv_bytes",
    "kv_needed",
    "layout_recall",
    "make_layout",
    "page_recall",
    "plot_layout",
    "present_pages",
    "segment_layout",
    "select_pages",
    "topk_layout",
)
