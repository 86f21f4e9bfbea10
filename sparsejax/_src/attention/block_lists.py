"""The block lists of a layout for each (batch, head): what the kernels walk.

A `Layout` stores one set of lists per distinct head pattern (a row) and maps
each (batch, head) to its row with `head_row`; these select each one's lists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._src.attention import layout as layout_lib


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
