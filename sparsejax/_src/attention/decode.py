"""Decode attention: a few new query tokens per sequence against a KV cache.

The cache is contiguous (``[batch, max_len, kv_heads, head_dim]``) or paged:
a pool of fixed-size pages (``[num_pages, page_size, kv_heads, head_dim]``)
and a page table per sequence (``int32[batch, pages_per_seq]``). Sequence
``b`` holds ``lengths[b]`` cached tokens, the new ones last: query token
``t`` of ``q_tokens`` sits at position ``lengths[b] - q_tokens + t`` and
sees the cached keys at positions up to its own, and only those a `mask`
allows at (query position, key position).

"xla" splits the cache into `num_splits` partitions, attends to each
(flash-decoding) and merges them with their log-sum-exps (`combine`, public
so partial results from devices can be merged the same way); "reference"
attends over the whole cache at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src import _checks
from sparsejax._src.attention import masks as masks_lib

IMPLEMENTATIONS = ("reference", "xla")


def combine(outs: jax.Array, lses: jax.Array, *, axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """Merges attention results over disjoint key sets by their log-sum-exps.

  Args:
    outs: [..., q_tokens, heads, head_dim] partial outputs stacked on `axis`.
    lses: [..., heads, q_tokens] float32 log-sum-exps stacked on `axis`
      (-inf where a part saw no key).
    axis: the stacking axis of both (it must be a leading axis).

  Returns:
    (out, lse): the attention over the union of the key sets; 0 and -inf
    where no part saw a key.

  Example:
    >>> out, lse = sja.combine(jnp.stack([o1, o2]), jnp.stack([l1, l2]))
  """
  lse = jax.nn.logsumexp(lses, axis=axis)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  weight = jnp.exp(lses - jnp.expand_dims(safe, axis))  # [..., heads, q_tokens]
  weight = jnp.swapaxes(weight, -1, -2)[..., None]  # [..., q_tokens, heads, 1]
  out = jnp.sum(weight * outs.astype(jnp.float32), axis=axis)
  return out.astype(outs.dtype), lse


def _gather_pages(cache: jax.Array, page_table: jax.Array) -> jax.Array:
  """[batch, pages_per_seq * page_size, kv_heads, head_dim] from a page pool."""
  pages = cache[page_table]  # [batch, pages_per_seq, page_size, kv_heads, d]
  b, n, size = pages.shape[:3]
  return pages.reshape(b, n * size, *pages.shape[3:])


def _check(q, k_cache, v_cache, lengths, page_table, mask, num_splits):
  if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
    raise ValueError(f"q must be [batch, q_tokens, heads, head_dim] and k_cache, v_cache one "
                     f"4-d shape, got {q.shape=}, {k_cache.shape=}, {v_cache.shape=}")
  batch, q_tokens, heads, dim = q.shape
  if k_cache.shape[3] != dim or heads % k_cache.shape[2]:
    raise ValueError(f"the cache must be [..., kv_heads, {dim}] with kv_heads dividing "
                     f"{heads}, got {k_cache.shape}")
  if page_table is None:
    if k_cache.shape[0] != batch:
      raise ValueError(f"k_cache must be [batch={batch}, max_len, kv_heads, head_dim] without "
                       f"a page_table, got {k_cache.shape}")
    capacity = k_cache.shape[1]
  else:
    if (page_table.ndim != 2 or page_table.shape[0] != batch
        or not jnp.issubdtype(page_table.dtype, jnp.integer)):
      raise ValueError(f"page_table must be int[batch={batch}, pages_per_seq], got "
                       f"{page_table.dtype}{list(page_table.shape)}")
    if _checks.is_concrete(page_table):
      bad = (page_table < 0) | (page_table >= k_cache.shape[0])
      if bool(jnp.any(bad)):
        raise ValueError(f"page_table holds pages outside the pool of {k_cache.shape[0]} "
                         f"pages: {jnp.asarray(page_table)[bad][:5].tolist()}")
    capacity = page_table.shape[1] * k_cache.shape[1]
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int[batch={batch}], got {lengths.dtype}"
                     f"{list(lengths.shape)}")
  if _checks.is_concrete(lengths):
    if bool(jnp.any((lengths > capacity) | (lengths < 0))):
      raise ValueError(f"lengths must be in [0, {capacity}] (the cache's capacity), got "
                       f"{jnp.asarray(lengths).tolist()}")
  if mask is not None:
    shape = masks_lib.as_head_masks(mask, heads)[0].shape
    if min(shape) < capacity:
      raise ValueError(f"mask has shape {shape}; it must cover the cache's capacity "
                       f"{capacity} in both dims")
  if num_splits is not None and (not _checks.is_int(num_splits) or num_splits < 1
                                 or capacity % num_splits):
    raise ValueError(f"num_splits={num_splits!r} must be a positive int dividing the cache's "
                     f"capacity {capacity}")
  return capacity


def _visible(mask, heads, lengths, q_tokens, kv_pos):
  """bool[batch, heads, q_tokens, kv]: causal within the cache, and the mask."""
  q_pos = lengths[:, None] - q_tokens + jnp.arange(q_tokens)[None, :]  # [batch, q_tokens]
  visible = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (q_pos[:, :, None] >= 0)
  visible = jnp.broadcast_to(visible[:, None], (lengths.shape[0], heads, q_tokens, kv_pos.size))
  if mask is None:
    return visible
  per_head = masks_lib.as_head_masks(mask, heads)
  qp, kp = q_pos[:, :, None], kv_pos[None, None, :]
  allowed = jnp.stack([m(qp, kp) for m in per_head], axis=1)
  return visible & allowed


def _attend(q, k, v, visible, sm_scale):
  """Attention over one set of keys: (out float32, lse float32[batch, heads, q_tokens]).

  Query heads are grouped over their key head (GQA) instead of repeating the
  cache, which would copy it.
  """
  batch, q_tokens, heads, dim = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, q_tokens, kv_heads, heads // kv_heads, dim)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
  s = s.reshape(batch, heads, q_tokens, k.shape[1])
  s = jnp.where(visible, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  p = p.reshape(batch, kv_heads, heads // kv_heads, q_tokens, k.shape[1])
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(batch, q_tokens, heads, dim), lse


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     *, page_table: jax.Array | None = None,
                     mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None,
                     implementation: str | None = None, num_splits: int | None = None,
                     sm_scale: float | None = None, return_lse: bool = False):
  """Attention of the newest tokens of each sequence over its KV cache.

  Args:
    q: [batch, q_tokens, heads, head_dim], the last `q_tokens` cached
      positions of each sequence.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], or with
      `page_table` a pool [num_pages, page_size, kv_heads, head_dim];
      kv_heads divides heads (GQA/MQA).
    lengths: int[batch]: cached tokens per sequence, the new ones included.
    page_table: int[batch, pages_per_seq]: the pool pages of each sequence,
      in order (None: a contiguous cache).
    mask: a `Mask` or `MultiHeadMask` over (query position, key position)
      that restricts attention further (a local window, S2 shards, ...).
    implementation: "reference" (the whole cache at once), "xla" (split-KV),
      or None for the fastest available ("xla"; Pallas decode kernels are to
      come).
    num_splits: partitions of the cache for "xla" (default: one per 512
      positions, at most 16), dividing its capacity.
    sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.
    return_lse: also return the float32 log-sum-exp [batch, heads, q_tokens]
      (-inf where nothing is visible), for `combine`.

  Returns:
    [batch, q_tokens, heads, head_dim] in q's dtype (0 where nothing is
    visible), and the lse if `return_lse`.

  Example:
    >>> out = sja.decode_attention(q, k_cache, v_cache, lengths,
    ...                            mask=sja.LocalMask((T, T), (1024, 0)))
  """
  if implementation is None:
    implementation = "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  capacity = _check(q, k_cache, v_cache, lengths, page_table, mask, num_splits)
  batch, q_tokens, heads, dim = q.shape
  sm_scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
  lengths = jnp.asarray(lengths, jnp.int32)
  if page_table is not None:
    k_cache, v_cache = _gather_pages(k_cache, page_table), _gather_pages(v_cache, page_table)
  if implementation == "reference" or batch == 0:
    out, lse = _attend(q, k_cache, v_cache,
                       _visible(mask, heads, lengths, q_tokens, jnp.arange(capacity)), sm_scale)
  else:
    if num_splits is None:
      num_splits = math.gcd(capacity, max(min(capacity // 512, 16), 1))
    size = capacity // num_splits

    def part(start):
      k = lax.dynamic_slice_in_dim(k_cache, start, size, axis=1)
      v = lax.dynamic_slice_in_dim(v_cache, start, size, axis=1)
      kv_pos = start + jnp.arange(size)
      return _attend(q, k, v, _visible(mask, heads, lengths, q_tokens, kv_pos), sm_scale)

    outs, lses = lax.map(part, jnp.arange(num_splits) * size)
    out, lse = combine(outs, lses)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out
