"""What the Pallas decode kernels read: page lists per program, query tiles, row visibility.

`page_lists` turns decode's page view (`decode.paged_view`) into, per
(sequence, KV head), the list of pages some new query may read (present, at
positions before the newest token, and kept by the mask's decode-time
pattern, `masks.kv_head_needed`, a superset, so the kernels still mask each key),
shared evenly among the split-KV programs of that (sequence, KV head).
`query_tile` groups the query heads of each KV head into one tile (GQA) and
`merge` undoes it and combines the splits. `kernel_masks` refuses masks a
kernel cannot evaluate. Inside a kernel, `query_rows`, `row_mask_ids` and
`visible` say which keys of a page each row of the tile sees.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src.attention import block_lists
from sparsejax._src.attention import decode
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import masks as masks_lib


class PageLists(NamedTuple):
  """The pages each (sequence, KV head, split) program reads.

  Attributes:
    phys: int32[batch, kv_heads, n]: pool pages, first those to read (in
      the order of the page view), then the others.
    logical: int32[batch, kv_heads, n]: the page number of each in its
      sequence (its keys sit at ``logical * page_size + j``).
    start, stop: int32[batch, kv_heads, splits]: split ``s`` reads the
      entries ``start[..., s]`` to ``stop[..., s] - 1``, an even share.
  """

  phys: jax.Array
  logical: jax.Array
  start: jax.Array
  stop: jax.Array


def kernel_masks(mask, heads: int, rows: int,
                 page_size: int) -> tuple[tuple[masks_lib.Mask, ...] | None, jax.Array | None]:
  """The distinct masks a kernel evaluates and each query head's index among them.

  Returns:
    (None, None) without a mask; else (the distinct head masks; int32[heads]
    mask ids, or None for a single mask).

  Raises:
    ValueError: for masks that read a table (`layout.kernel_masks`).
  """
  if mask is None:
    return None, None
  distinct = {}
  ids = np.array([distinct.setdefault(m, len(distinct))
                  for m in masks_lib.as_head_masks(mask, heads)], np.int32)
  if layout_lib.kernel_masks(tuple(distinct), rows, page_size) is None:
    names = sorted({type(m).__name__ for m in distinct})
    raise ValueError(f"mask ({', '.join(names)}) reads a table, which the Pallas decode kernels "
                     f"cannot evaluate (BigBirdMask, VerticalSlashMask and NumpyMask do); use "
                     f"implementation=\"xla\"")
  return tuple(distinct), None if len(distinct) == 1 else jnp.asarray(ids)


def page_lists(phys: jax.Array, logical: jax.Array, lengths: jax.Array, mask, *, heads: int,
               q_tokens: int, page_size: int, splits: int) -> PageLists:
  """The pages to read per (sequence, KV head), first, shared among `splits` programs.

  A page is read if it is present, holds a position before the newest
  token, and (with a mask) a key that some new query may read.
  """
  read = (phys >= 0) & (logical >= 0) & (logical * page_size < lengths[:, None, None])
  if mask is not None:
    pos = logical[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)[None, None, None]
    at = jnp.maximum(lengths - q_tokens, 0)[:, None, None, None]
    if not isinstance(mask, masks_lib.Mask):
      mask = masks_lib.MultiHeadMask(masks_lib.as_head_masks(mask, heads))
    read &= masks_lib.kv_head_needed(mask, at, pos, kv_heads=pos.shape[1]).any(-1)
  order = jnp.argsort(jnp.where(read, 0, 1), axis=-1, stable=True)
  count = jnp.sum(read, axis=-1, dtype=jnp.int32)[..., None]
  edges = jnp.arange(splits + 1, dtype=jnp.int32)[None, None]
  bounds = count * edges // splits  # [batch, kv_heads, splits + 1]
  return PageLists(jnp.take_along_axis(phys, order, axis=2),
                   jnp.take_along_axis(logical, order, axis=2), bounds[..., :-1], bounds[..., 1:])


def query_tile(q: jax.Array, kv_heads: int, rows: int) -> jax.Array:
  """[batch, kv_heads, rows, head_dim]: the query heads of each KV head, padded to `rows`.

  Row ``g * q_tokens + t`` holds token ``t`` of the KV head's query head ``g``.
  """
  batch, q_tokens, heads, dim = q.shape
  groups = heads // kv_heads
  tile = q.reshape(batch, q_tokens, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  tile = tile.reshape(batch, kv_heads, groups * q_tokens, dim)
  return jnp.pad(tile, [(0, 0), (0, 0), (0, rows - groups * q_tokens), (0, 0)])


def merge(out: jax.Array, lse: jax.Array, q_tokens: int, heads: int):
  """The splits' tiles (out [splits, batch, kv_heads, rows, d], lse [splits, batch, kv_heads,
  rows]) as (out float32[batch, q_tokens, heads, d], lse float32[batch, heads, q_tokens])."""
  splits, batch, kv_heads, _, dim = out.shape
  groups = heads // kv_heads
  out = out[:, :, :, :groups * q_tokens].reshape(splits, batch, kv_heads, groups, q_tokens, dim)
  out = out.transpose(0, 1, 4, 2, 3, 5).reshape(splits, batch, q_tokens, heads, dim)
  lse = lse[:, :, :, :groups * q_tokens].reshape(splits, batch, heads, q_tokens)
  if splits == 1:
    return out[0], lse[0]
  return decode.combine(out, lse)


# Inside the kernels.


def query_rows(rows: int, q_tokens: int, used: int, length):
  """int32[rows, 1] query positions of a tile's rows (-1 past `used`), and each row's head in
  its group (`query_tile`'s order)."""
  r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  group = lax.div(r, q_tokens) if q_tokens > 1 else r
  pos = length - q_tokens + (r - group * q_tokens)
  return jnp.where(r < used, pos, -1), group


def row_mask_ids(read_id, kv_head, groups: int, group: jax.Array) -> jax.Array:
  """int32[rows, 1]: each row's mask id; ``read_id(head)`` loads one query head's id."""
  ids = jnp.zeros(group.shape, jnp.int32)
  for g in range(groups):
    ids = jnp.where(group == g, read_id(kv_head * groups + g), ids)
  return ids


def visible(masks, mask_id, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
  """bool[rows, page_size]: causal within the cache, and the row's mask (if any)."""
  out = (kv_pos <= q_pos) & (q_pos >= 0)
  if masks is not None:
    out &= block_lists.visible(masks, mask_id, q_pos, kv_pos)
  return out
