"""Packed documents: a layout restricted to the blocks where segments meet, inside jit.

A query block and a key block can share a segment only if their id ranges
overlap, so `segment_layout` keeps the active blocks of a layout whose
[min id, max id] ranges overlap, per batch element. That is exact for sorted
ids (packed documents) and a superset otherwise; the implementations mask
elements by ``q_segment_ids[i] == kv_segment_ids[j]`` inside the blocks kept,
so no key is ever dropped. The result keeps the list lengths of the base
layout (removing blocks never lengthens a list), so shapes are static and
nothing recompiles when the documents change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import layout as layout_lib


def check_ids(q_segment_ids, kv_segment_ids, batch: int, q_len: int, kv_len: int):
  """The ids as int32 arrays; kv ids default to the q ids. Raises ValueError on bad input."""
  if q_segment_ids is None:
    if kv_segment_ids is not None:
      raise ValueError("kv_segment_ids needs q_segment_ids too")
    return None, None
  if kv_segment_ids is None:
    if q_len != kv_len:
      raise ValueError(f"kv_segment_ids is required when q_len ({q_len}) != kv_len ({kv_len})")
    kv_segment_ids = q_segment_ids
  ids = []
  for name, value, length in [("q_segment_ids", q_segment_ids, q_len),
                              ("kv_segment_ids", kv_segment_ids, kv_len)]:
    if not hasattr(value, "shape") or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array [batch, seq], got "
                       f"{getattr(value, 'dtype', type(value).__name__)}")
    if tuple(value.shape) != (batch, length):
      raise ValueError(f"{name} must have shape [batch, seq] = {(batch, length)}, got "
                       f"{tuple(value.shape)}")
    ids.append(jnp.asarray(value, jnp.int32))
  return tuple(ids)


def _ranges(ids: jax.Array, block: int):
  blocks = ids.reshape(ids.shape[0], ids.shape[1] // block, block)  # batch may be 0
  return blocks.min(-1), blocks.max(-1)  # [batch, blocks] each


def segment_layout(layout: layout_lib.Layout, q_segment_ids: jax.Array,
                   kv_segment_ids: jax.Array | None = None) -> layout_lib.Layout:
  """`layout` without the blocks where no query and key share a segment (traceable).

  Args:
    layout: a `Layout` for these lengths.
    q_segment_ids: int[batch, q_len].
    kv_segment_ids: int[batch, kv_len]; default the q ids (needs q_len == kv_len).

  Returns:
    a `Layout` with one row per (batch, layout row) and the list lengths of
    `layout`; pass the same segment ids to `block_sparse_attention` with it.
    It keeps the rows' `masks` where their rows are known statically.

  Example:
    >>> ids = jnp.cumsum(tokens == SEP, axis=1)     # a document per separator
    >>> layout = sja.segment_layout(causal_layout, ids)
  """
  batch = q_segment_ids.shape[0]
  q_ids, kv_ids = check_ids(q_segment_ids, kv_segment_ids, batch, layout.q_len, layout.kv_len)
  if layout.head_row.shape[0] not in (1, batch):
    raise ValueError(f"the layout has rows for batch {layout.head_row.shape[0]}, got segment "
                     f"ids for batch {batch}")
  rows, nq, max_kv = layout.kv_index.shape
  nk, max_q = layout.num_q.shape[1], layout.q_index.shape[-1]
  active, partial_index = layout_lib.block_tables(layout)  # [rows, nq, nk]
  q_lo, q_hi = _ranges(q_ids, layout.block_q)
  kv_lo, kv_hi = _ranges(kv_ids, layout.block_kv)
  meet = (q_lo[:, :, None] <= kv_hi[:, None, :]) & (kv_lo[:, None, :] <= q_hi[:, :, None])
  heads = layout.num_heads
  if layout.head_row.shape[0] == batch > 1:  # already per batch (topk_layout): a row per head
    base = layout.head_row  # [batch, heads]
    active = active[base] & meet[:, None]
    partial_index = partial_index[base]
    head_row = jnp.arange(batch * heads, dtype=jnp.int32).reshape(batch, heads)
    masks = None
    if layout.masks is not None and _checks.is_concrete(base):
      masks = tuple(layout.masks[r] for r in np.asarray(base).reshape(-1))
  else:  # shared by the batch: a row per (batch, layout row)
    active = active[None] & meet[:, None]
    partial_index = jnp.broadcast_to(partial_index[None], active.shape)
    head_row = (jnp.arange(batch, dtype=jnp.int32)[:, None] * rows
                + jnp.broadcast_to(layout.head_row, (batch, heads)))
    masks = None if layout.masks is None else layout.masks * batch
  new_rows = active.shape[0] * active.shape[1]
  return layout_lib.from_blocks(active.reshape(new_rows, nq, nk),
                                partial_index.reshape(new_rows, nq, nk), layout.partial,
                                head_row, max_kv, max_q)._replace(masks=masks)
