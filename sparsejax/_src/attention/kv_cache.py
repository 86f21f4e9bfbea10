"""A paged KV cache for decoding: pages of one KV head each, page summaries, pruning by pattern.

`KVCache` is a pytree of arrays, so it lives inside a jitted generation loop.
Pages are taken from a pool as tokens arrive (`append`); a pattern that holds
at decode time (a local window, an A-shape, S2 shards, chunks) lets `append`
free the pages no future query can read and never write the keys none will
(`kv_needed`), so the pool, and the bytes read per step, stay small.
Per page the cache keeps the elementwise min and max of its keys, from which
`select_pages` bounds ``q . k`` on the page and picks the most promising
pages per step (Quest).

Reference: Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference. Tang, Zhao, Zhu, Xiao, Kasikci, Han, 2024. arXiv:2406.10774.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import decode
from sparsejax._src.attention import masks as masks_lib


class KVCache(NamedTuple):
  """A paged KV cache (a pytree of arrays).

  Attributes:
    k, v: [num_pages, page_size, head_dim]: the pool; a page holds one KV
      head of `page_size` consecutive positions of one sequence.
    page_table: int32[batch, kv_heads, pages_per_seq]: the pool page of each
      page of each sequence and KV head, -1 where there is none (not yet
      written, or dropped).
    lengths: int32[batch]: tokens appended per sequence.
    key_min, key_max: [num_pages, head_dim] float32: elementwise bounds of the
      keys written to each page (for `select_pages`).
    dropped: int32[batch]: tokens that found no free page for some KV head
      and were not cached there (always 0 when the pool is large enough;
      check it when it is not).
  """

  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  key_min: jax.Array
  key_max: jax.Array
  dropped: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[1]

  @property
  def capacity(self) -> int:
    return self.page_table.shape[2] * self.k.shape[1]


def init_cache(batch: int, kv_heads: int, head_dim: int, *, page_size: int, max_len: int,
               num_pages: int | None = None, dtype=jnp.float32) -> KVCache:
  """An empty cache for `batch` sequences of up to `max_len` tokens.

  Args:
    batch, kv_heads, head_dim: the cache's shape.
    page_size: positions per page; it divides `max_len`.
    max_len: the capacity of each sequence.
    num_pages: pages in the pool (default: ``batch * kv_heads * max_len /
      page_size``, all a dense cache needs). A pattern that drops pages runs
      in fewer; `kv_bytes` tells how many bytes are in use.
    dtype: of the keys and values.

  Example:
    >>> cache = sja.init_cache(1, 2, 64, page_size=16, max_len=4096)
    >>> cache = sja.append(cache, k_prompt, v_prompt)  # [1, prompt, 2, 64]
  """
  for name, value in [("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                      ("page_size", page_size), ("max_len", max_len)]:
    _checks.static_int(name, value, minimum=0 if name == "batch" else 1)
  if max_len % page_size:
    raise ValueError(f"{page_size=} must divide {max_len=}")
  pages_per_seq = max_len // page_size
  num_pages = batch * kv_heads * pages_per_seq if num_pages is None else _checks.static_int(
      "num_pages", num_pages, minimum=1)
  pool = lambda: jnp.zeros((num_pages, page_size, head_dim), dtype)  # noqa: E731  (two buffers)
  return KVCache(pool(), pool(), jnp.full((batch, kv_heads, pages_per_seq), -1, jnp.int32),
                 jnp.zeros((batch,), jnp.int32),
                 jnp.full((num_pages, head_dim), jnp.inf, jnp.float32),
                 jnp.full((num_pages, head_dim), -jnp.inf, jnp.float32),
                 jnp.zeros((batch,), jnp.int32))


def kv_needed(mask: masks_lib.Mask | masks_lib.MultiHeadMask, kv_positions: jax.Array, *,
              query_position: jax.Array, num_heads: int) -> jax.Array:
  """Which keys a query at `query_position` or later may still read under `mask`.

  Exact for the patterns that hold at decode time: `LocalMask` (keys within
  the window of the query), `AShapeMask` (the sinks and the window),
  `ChunkedCausalMask` (the current chunk), `StridedShardMask` (the head's
  shard and its window), and their ``|``; a superset for their ``&``. Other
  masks keep every key (safe, and no saving).

  Args:
    mask: a `Mask` or a `MultiHeadMask` with `num_heads` heads.
    kv_positions: int[...]: key positions.
    query_position: int[batch]: the position of the next query per sequence
      (a `KVCache`'s `lengths` before the token is appended).
    num_heads: heads of the model (query heads).

  Returns:
    bool[batch, num_heads, *kv_positions.shape]; over all heads: ``.any(1)``.

  Example:
    >>> keep = sja.kv_needed(sja.AShapeMask((T, T), 4, 256), jnp.arange(T),
    ...                      query_position=cache.lengths, num_heads=8)
  """
  heads = masks_lib.MultiHeadMask(masks_lib.as_head_masks(mask, num_heads))
  pos = jnp.asarray(kv_positions, jnp.int32)
  at = jnp.asarray(query_position, jnp.int32)
  if at.ndim != 1:
    raise ValueError(f"query_position must be int[batch], got shape {at.shape}")
  at = at.reshape(-1, *(1,) * (pos.ndim + 1))
  return masks_lib.kv_head_needed(heads, at, pos[None, None], kv_heads=num_heads)


def append(cache: KVCache, k: jax.Array, v: jax.Array, *,
           mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None,
           prefill: bool = False) -> KVCache:
  """Appends `k`, `v` for the next tokens of every sequence.

  With a `mask`, pages no query from the first new token on can read are
  freed first, and new keys no such query reads are never written: the cache
  then holds what decoding under `mask` needs (`kv_needed`), and decoding it
  equals decoding the full cache under `mask`. Pages are taken from the free
  pool in order; a token that finds none is not cached and counted in
  `cache.dropped` (inside jit; outside, a `ValueError` says so).

  Args:
    cache: a `KVCache`.
    k, v: [batch, new_tokens, kv_heads, head_dim].
    mask: the pattern decoding will use (a `Mask` or `MultiHeadMask` with a
      multiple of kv_heads heads, covering the capacity), or None.
    prefill: the new tokens' own queries are attended elsewhere (a prompt
      run through `block_sparse_attention`): keep only what queries after
      them read, so a long prompt never fills the pool. Decoding then starts
      with the next `append`ed token: a query at a prefilled position may
      find keys it reads already dropped.

  Returns:
    the cache with ``lengths + new_tokens`` tokens per sequence.
  """
  if not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a sja.KVCache (sja.init_cache), got {type(cache).__name__}")
  batch, kv_heads, _ = cache.page_table.shape
  for name, x in [("k", k), ("v", v)]:
    _checks.floating_array(name, x)
  if k.shape != v.shape or k.ndim != 4 or k.shape[0] != batch or k.shape[2:] != (
      kv_heads, cache.k.shape[2]):
    raise ValueError(f"k and v must be [batch={batch}, new_tokens, kv_heads={kv_heads}, "
                     f"head_dim={cache.k.shape[2]}], got {k.shape=}, {v.shape=}")
  new = k.shape[1]
  dropped = np.asarray(cache.dropped) if _checks.is_concrete(cache.dropped) else None
  if _checks.is_concrete(cache.lengths) and (np.asarray(cache.lengths) + new > cache.capacity).any():
    raise ValueError(f"appending {new} tokens overflows the capacity {cache.capacity} of "
                     f"sequences with lengths {np.asarray(cache.lengths).tolist()}")
  _check_mask(mask, cache)
  if not isinstance(prefill, bool):
    raise ValueError(f"prefill must be a Python bool (it shapes the computation), got {prefill!r}")
  cache = _append(cache, k, v, mask=mask, prefill=prefill)
  if _checks.is_concrete(cache.dropped) and (np.asarray(cache.dropped) > np.asarray(dropped)).any():
    raise ValueError(f"the pool of {cache.k.shape[0]} pages is full: no page for "
                     f"{(np.asarray(cache.dropped) - dropped).tolist()} tokens (per sequence); "
                     f"init_cache(num_pages=...) larger, or append with a mask that drops pages")
  return cache


@functools.partial(jax.jit, static_argnames=("mask", "prefill"))
def _append(cache, k, v, *, mask, prefill):
  """`append` after its checks, jitted."""
  batch, kv_heads, n_pages = cache.page_table.shape
  size, num_pages, new = cache.page_size, cache.k.shape[0], k.shape[1]
  start = cache.lengths
  at = start + new if prefill else start  # the first query decoding will ask
  table = cache.page_table
  pos = start[:, None] + jnp.arange(new, dtype=jnp.int32)[None]  # [batch, new]
  write = jnp.broadcast_to((pos < cache.capacity)[:, None], (batch, kv_heads, new))
  if mask is not None:
    page_pos = jnp.arange(n_pages * size, dtype=jnp.int32).reshape(n_pages, size)
    keep = masks_lib.kv_head_needed(mask, at[:, None, None, None], page_pos[None, None],
                                    kv_heads=kv_heads).any(-1)
    keep |= jnp.arange(n_pages)[None, None] >= (at // size)[:, None, None]  # the open page on
    table = jnp.where(keep, table, -1)
    write &= masks_lib.kv_head_needed(mask, at[:, None, None], pos[:, None],
                                      kv_heads=kv_heads)
  # Pages to allocate: those a written token falls in that have none.
  page_of = jnp.minimum(pos // size, n_pages - 1)  # [batch, new]
  hit = jnp.zeros((batch, kv_heads, n_pages), bool).at[
      jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None],
      page_of[:, None, :]].max(write)
  want = hit & (table < 0)
  used = jnp.zeros((num_pages,), bool).at[jnp.where(table >= 0, table, num_pages)].set(
      True, mode="drop")
  most = batch * kv_heads * min(n_pages, new // size + 2)
  free = jnp.nonzero(~used, size=most, fill_value=-1)[0]
  rank = jnp.cumsum(want.reshape(-1)).reshape(want.shape) - 1
  fresh = jnp.where(want, free[jnp.clip(rank, 0, most - 1)], -1)
  table = jnp.where(want, fresh, table)
  # Write the tokens and refresh the bounds of the pages they land in.
  phys = jnp.take_along_axis(table, jnp.broadcast_to(page_of[:, None], write.shape), axis=2)
  ok = write & (phys >= 0)
  target = jnp.where(ok, phys, num_pages)  # out of range: dropped
  slot = jnp.broadcast_to((pos % size)[:, None], write.shape)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [batch, kv_heads, new, d]
  key_min = cache.key_min.at[jnp.where(want, fresh, num_pages)].set(jnp.inf, mode="drop")
  key_max = cache.key_max.at[jnp.where(want, fresh, num_pages)].set(-jnp.inf, mode="drop")
  kf = kt.astype(jnp.float32)
  lost = (write & (phys < 0)).any(1) | (pos >= cache.capacity)  # [batch, new]
  dropped = cache.dropped + jnp.sum(lost, axis=1)
  return KVCache(cache.k.at[target, slot].set(kt.astype(cache.k.dtype), mode="drop"),
                 cache.v.at[target, slot].set(vt.astype(cache.v.dtype), mode="drop"),
                 table, start + new,
                 key_min.at[target].min(kf, mode="drop"), key_max.at[target].max(kf, mode="drop"),
                 dropped)


def present_pages(cache: KVCache, *, k_pages: int) -> jax.Array:
  """The pages a cache holds, per KV head: all of a pruned cache's, for `decode_attention`.

  A cache pruned by a pattern keeps a bounded number of pages (a window's,
  the sinks', a shard's); attending to those only reads nothing else.

  Args:
    cache: a `KVCache`.
    k_pages: how many to return, at most pages_per_seq; where a KV head
      holds more, its newest `k_pages` (then decoding is no longer exact).

  Returns:
    int32[batch, kv_heads, k_pages]: page indices, ascending, -1 padded.

  Example:
    >>> pages = sja.present_pages(cache, k_pages=4096 // 16 + 2)  # window 4096
  """
  _check_k_pages(k_pages, cache)
  return _present_pages(cache, k_pages=k_pages)


@functools.partial(jax.jit, static_argnames="k_pages")
def _present_pages(cache, *, k_pages):
  page = jnp.arange(cache.page_table.shape[2], dtype=jnp.int32)
  return _top_pages(jnp.where(cache.page_table >= 0, page, -jnp.inf), k_pages)


def _check_k_pages(k_pages, cache) -> int:
  """Validates a cache and a number of pages to choose; returns the pages a sequence has."""
  if not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a sja.KVCache (sja.init_cache), got {type(cache).__name__}")
  n_pages = cache.page_table.shape[2]
  _checks.static_int("k_pages", k_pages, minimum=1)
  if k_pages > n_pages:
    raise ValueError(f"k_pages={k_pages} is more than the {n_pages} pages a sequence has")
  return n_pages


def _top_pages(score, k_pages):
  """int32[..., k_pages]: the pages of highest score, ascending; -1 for -inf ones."""
  top_score, top = jax.lax.top_k(score, k_pages)
  chosen = jnp.sort(jnp.where(top_score > -jnp.inf, top, score.shape[-1]), axis=-1)
  return jnp.where(chosen < score.shape[-1], chosen, -1).astype(jnp.int32)


def _check_mask(mask, cache):
  if mask is not None and not isinstance(mask, (masks_lib.Mask, masks_lib.MultiHeadMask)):
    raise ValueError(f"mask must be a sja.Mask or sja.MultiHeadMask, got {type(mask).__name__}")
  if mask is not None and min(mask.shape) < cache.capacity:
    raise ValueError(f"mask has shape {mask.shape}; it must cover the cache's capacity "
                     f"{cache.capacity} in both dims")
  kv_heads = cache.page_table.shape[1]
  if isinstance(mask, masks_lib.MultiHeadMask) and len(mask) % kv_heads:
    raise ValueError(f"mask has {len(mask)} heads; it must be a multiple of the cache's "
                     f"kv_heads={kv_heads}")


def kv_bytes(cache: KVCache) -> jax.Array:
  """Bytes of keys and values in the pages the cache uses (pages in use x page bytes)."""
  page = 2 * cache.k.shape[1] * cache.k.shape[2] * cache.k.dtype.itemsize
  return jnp.sum(cache.page_table >= 0) * page


def select_pages(q: jax.Array, cache: KVCache, *, k_pages: int,
                 mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None) -> jax.Array:
  """Quest page selection: per KV head, the `k_pages` pages with the largest bound on q.k.

  On a page with key bounds ``m <= k <= M`` (elementwise), ``q . k <=
  sum_d max(q_d m_d, q_d M_d)``; a KV head takes the largest bound over its
  query heads and tokens. The page of the newest token is always chosen;
  absent pages, pages past the length and, with a `mask`, pages none of the
  new queries can read under it never are.

  Args:
    q: [batch, q_tokens, heads, head_dim], as for `decode_attention`.
    cache: a `KVCache`.
    k_pages: pages to choose per (sequence, KV head), at most pages_per_seq.
    mask: the `Mask` or `MultiHeadMask` decoding will use, or None.

  Returns:
    int32[batch, kv_heads, k_pages]: page indices for `decode_attention`'s
    `pages`, ascending, -1 where fewer pages exist.

  Example:
    >>> pages = sja.select_pages(q, cache, k_pages=64)
    >>> out = sja.decode_attention(q, cache.k, cache.v, cache.lengths,
    ...                            page_table=cache.page_table, pages=pages)
  """
  batch, kv_heads, _ = cache.page_table.shape
  _check_k_pages(k_pages, cache)
  if (getattr(q, "ndim", None) != 4 or q.shape[0] != batch or q.shape[2] % kv_heads
      or q.shape[3] != cache.k.shape[2]):
    raise ValueError(f"q must be [batch={batch}, q_tokens, heads (a multiple of {kv_heads}), "
                     f"{cache.k.shape[2]}], got {getattr(q, 'shape', type(q).__name__)}")
  _check_mask(mask, cache)
  if isinstance(mask, masks_lib.MultiHeadMask) and len(mask) != q.shape[2]:
    raise ValueError(f"mask has {len(mask)} heads, q has {q.shape[2]}")
  return _select_pages(q, cache, k_pages=k_pages, mask=mask)


@functools.partial(jax.jit, static_argnames=("k_pages", "mask"))
def _select_pages(q, cache, *, k_pages, mask):
  batch, kv_heads, n_pages = cache.page_table.shape
  table = cache.page_table
  lo = cache.key_min[jnp.maximum(table, 0)]  # [batch, kv_heads, pages, d]
  hi = cache.key_max[jnp.maximum(table, 0)]
  qg = q.reshape(batch, q.shape[1], kv_heads, -1, q.shape[3]).astype(jnp.float32)
  bound = jnp.einsum("btkgd,bkpd->bkgtp", jnp.maximum(qg, 0), hi) + jnp.einsum(
      "btkgd,bkpd->bkgtp", jnp.minimum(qg, 0), lo)
  score = bound.max(axis=(2, 3))  # [batch, kv_heads, pages]
  page = jnp.arange(n_pages)[None, None]
  last = jnp.maximum(cache.lengths - 1, 0)[:, None, None] // cache.page_size
  score = jnp.where(page == last, jnp.inf, score)
  readable = (table >= 0) & (page * cache.page_size < cache.lengths[:, None, None])
  if mask is not None:
    pos = jnp.arange(n_pages * cache.page_size, dtype=jnp.int32).reshape(n_pages, -1)
    at = jnp.maximum(cache.lengths - q.shape[1], 0)[:, None, None, None]
    readable &= masks_lib.kv_head_needed(mask, at, pos[None, None], kv_heads=kv_heads).any(-1)
  score = jnp.where(readable, score, -jnp.inf)
  return _top_pages(score, k_pages)


def page_recall(q: jax.Array, cache: KVCache, pages: jax.Array, *,
                mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None,
                sm_scale: float | None = None) -> jax.Array:
  """The fraction of full attention's softmax mass that the chosen `pages` hold.

  ``exp(lse(pages) - lse(all pages))`` from two `decode_attention` calls: 1
  for every page, and 1 where no key is visible.

  Returns:
    float32[batch, heads, q_tokens].
  """
  args = (q, cache.k, cache.v, cache.lengths)
  kw = dict(page_table=cache.page_table, mask=mask, sm_scale=sm_scale, return_lse=True)
  _, full = decode.decode_attention(*args, **kw)
  _, part = decode.decode_attention(*args, pages=pages, **kw)
  return jnp.where(jnp.isfinite(full), jnp.exp(part - jnp.where(jnp.isfinite(full), full, 0.0)),
                   1.0)

