"""The block lists of a layout for each (batch, head): what the kernels walk.

A `Layout` stores one set of lists per distinct head pattern (a row) and maps
each (batch, head) to its row with `head_row`; these select each one's lists,
and the masks a kernel evaluates in partial blocks when the layout has them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import masks as masks_lib


def head_rows(layout: layout_lib.Layout, batch: int) -> jax.Array:
  """int32[batch, heads]: the layout row of each (batch, head)."""
  return jnp.broadcast_to(layout.head_row, (batch, layout.num_heads))


def for_heads(layout: layout_lib.Layout, batch: int, *,
              transposed: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The block lists of each (batch, head).

  Args:
    layout: a `Layout`.
    batch: the batch size.
    transposed: the query blocks of each key block (`num_q`, `q_index`,
      `q_partial`, for the dK/dV pass) instead of the key blocks of each
      query block (`num_kv`, `kv_index`, `kv_partial`).

  Returns:
    (count int32[batch, heads, blocks], index int32[batch, heads, blocks, slots],
    partial int32[batch, heads, blocks, slots]).
  """
  rows = head_rows(layout, batch)
  if transposed:
    lists = layout.num_q, layout.q_index, layout.q_partial
  else:
    lists = layout.num_kv, layout.kv_index, layout.kv_partial
  count, index, partial = (x[rows] for x in lists)
  return count, index, partial


def masks_for_heads(layout: layout_lib.Layout,
                    batch: int) -> tuple[tuple[masks_lib.Mask, ...] | None, jax.Array | None]:
  """The masks a kernel evaluates for partial blocks, and which one each (batch, head) uses.

  Returns:
    (the layout's distinct row masks, or None to load the element-mask table;
    int32[batch, heads] the index of each (batch, head)'s mask among them, or
    None when there is one).
  """
  if not layout.masks:  # None, or no rows (an empty batch)
    return None, None
  distinct = {}
  of_row = np.array([distinct.setdefault(m, len(distinct)) for m in layout.masks], np.int32)
  if len(distinct) == 1:
    return tuple(distinct), None
  return tuple(distinct), jnp.asarray(of_row)[head_rows(layout, batch)]


def visible(masks: tuple[masks_lib.Mask, ...], mask_id, q_pos, kv_pos) -> jax.Array:
  """Inside a kernel: ``masks[mask_id](q_pos, kv_pos)`` at global int32 positions.

  Each mask is evaluated and the one of `mask_id` (a scalar; ignored for a
  single mask) selected: a handful of elementwise ops per mask.
  """
  out = masks[0](q_pos, kv_pos)
  for n, m in enumerate(masks[1:], 1):
    out = jnp.where(mask_id == n, m(q_pos, kv_pos), out)
  return out
