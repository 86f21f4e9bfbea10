"""Decode attention: a few new query tokens per sequence against a KV cache.

The cache is contiguous (``[batch, max_len, kv_heads, head_dim]``) or paged:
a pool of fixed-size pages and a page table. Pages hold every KV head
(pool ``[num_pages, page_size, kv_heads, head_dim]``, table
``int[batch, pages_per_seq]``) or one each (pool ``[num_pages, page_size,
head_dim]``, table ``int[batch, kv_heads, pages_per_seq]``, as `KVCache`
keeps them, so heads can drop different pages); -1 in a table is a page
that is not there. Sequence ``b`` holds ``lengths[b]`` cached tokens, the
new ones last: query token ``t`` of ``q_tokens`` sits at position
``lengths[b] - q_tokens + t`` and sees the cached keys at positions up to
its own, and only those a `mask` allows at (query position, key position).
`pages` narrows a paged cache to chosen pages per KV head (`select_pages`).

"xla" attends in `num_splits` partitions of the cache (flash-decoding,
bounding the memory of the scores) merged by their log-sum-exps (`combine`,
public so partial results from devices can be merged the same way);
"reference" attends over the whole cache at once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import masks as masks_lib

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
KERNEL_PAGE = 64  # positions per page when a Pallas kernel reads a contiguous cache


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


_SCORES_PER_SPLIT = 1 << 24  # "xla" splits the cache when the scores would be larger


def _check(q, k_cache, v_cache, lengths, page_table, pages, mask, num_splits):
  """Validates the arguments of `decode_attention`."""
  for name, x in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]:
    _checks.floating_array(name, x)
  for name, x in [("lengths", lengths), ("page_table", page_table), ("pages", pages)]:
    if x is not None and not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an int array, got {type(x).__name__}")
  if q.ndim != 4 or k_cache.shape != v_cache.shape:
    raise ValueError(f"q must be [batch, q_tokens, heads, head_dim] and k_cache, v_cache of one "
                     f"shape, got {q.shape=}, {k_cache.shape=}, {v_cache.shape=}")
  batch, _, heads, dim = q.shape
  if page_table is None:
    if k_cache.ndim != 4 or k_cache.shape[0] != batch:
      raise ValueError(f"k_cache must be [batch={batch}, max_len, kv_heads, head_dim] without "
                       f"a page_table, got {k_cache.shape}")
    if pages is not None:
      raise ValueError("pages needs a paged cache and its page_table (sja.KVCache keeps one)")
    kv_heads, capacity, page_size = k_cache.shape[2], k_cache.shape[1], None
  else:
    table = f"int[batch={batch}, pages_per_seq] or int[batch={batch}, kv_heads, pages_per_seq]"
    if (page_table.ndim not in (2, 3) or page_table.shape[0] != batch
        or not jnp.issubdtype(page_table.dtype, jnp.integer)):
      raise ValueError(f"page_table must be {table}, got {page_table.dtype}"
                       f"{list(page_table.shape)}")
    if k_cache.ndim != 6 - page_table.ndim:
      pool = "[num_pages, page_size, kv_heads, head_dim]" if page_table.ndim == 2 else (
          "[num_pages, page_size, head_dim] (pages of one KV head each)")
      raise ValueError(f"with a {page_table.ndim}-d page_table, k_cache must be a pool {pool}, "
                       f"got {k_cache.shape}")
    kv_heads = k_cache.shape[2] if page_table.ndim == 2 else page_table.shape[1]
    if _checks.is_concrete(page_table):
      table = np.asarray(page_table)
      bad = (table < -1) | (table >= k_cache.shape[0])
      if bad.any():
        raise ValueError(f"page_table holds pages outside the pool of {k_cache.shape[0]} "
                         f"pages (or -1): {table[bad][:5].tolist()}")
    page_size = k_cache.shape[1]
    capacity = page_table.shape[-1] * page_size
  if k_cache.shape[-1] != dim or kv_heads < 1 or heads % kv_heads:
    raise ValueError(f"the cache must have head_dim {dim} and kv_heads dividing heads={heads}, "
                     f"got {k_cache.shape=}" + ("" if page_table is None else
                                                 f" with {page_table.shape=}"))
  if pages is not None:
    if (pages.ndim != 3 or pages.shape[:2] != (batch, kv_heads)
        or not jnp.issubdtype(pages.dtype, jnp.integer)):
      raise ValueError(f"pages must be int[batch={batch}, kv_heads={kv_heads}, num_selected], "
                       f"got {pages.dtype}{list(pages.shape)}")
    if pages.shape[2] > page_table.shape[-1]:
      raise ValueError(f"pages selects {pages.shape[2]} pages of sequences that have "
                       f"{page_table.shape[-1]} (page_table's last dim)")
    chosen = np.asarray(pages) if _checks.is_concrete(pages) else None
    if chosen is not None and ((chosen < -1) | (chosen >= page_table.shape[-1])).any():
      raise ValueError(f"pages must index page_table's last dim (0..{page_table.shape[-1] - 1}, "
                       f"or -1 for none), got {chosen.min()}..{chosen.max()}")
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int[batch={batch}], got {lengths.dtype}"
                     f"{list(lengths.shape)}")
  if _checks.is_concrete(lengths):
    if ((np.asarray(lengths) > capacity) | (np.asarray(lengths) < 0)).any():
      raise ValueError(f"lengths must be in [0, {capacity}] (the cache's capacity), got "
                       f"{np.asarray(lengths).tolist()}")
  if mask is not None:
    shape = masks_lib.as_head_masks(mask, heads)[0].shape
    if min(shape) < capacity:
      raise ValueError(f"mask has shape {shape}; it must cover the cache's capacity "
                       f"{capacity} in both dims")
  blocks = capacity if page_size is None else (
      page_table.shape[-1] if pages is None else pages.shape[2])
  unit = "capacity" if page_size is None else "number of pages attended"
  if num_splits is not None and (not _checks.is_int(num_splits) or num_splits < 1
                                 or blocks % num_splits):
    raise ValueError(f"num_splits={num_splits!r} must be a positive int dividing the cache's "
                     f"{unit} {blocks}")


def paged_view(k_cache, page_table, pages):
  """Which pages each (sequence, KV head) attends, in the one form every implementation reads.

  Returns:
    (pool, phys, logical, head): `pool` [num_pages, page_size, pool_heads,
    head_dim] (a view of `k_cache`); `phys` int32[batch, kv_heads, n]: pool
    pages, -1 where absent; `logical` int32[batch, kv_heads, n]: their page
    numbers in the sequence (keys ``logical * page_size + j``); `head`
    int32[kv_heads]: each KV head's index in the pool's head axis.
  """
  if page_table.ndim == 2:
    kv_heads = k_cache.shape[2]
    phys = jnp.broadcast_to(page_table[:, None, :], (page_table.shape[0], kv_heads,
                                                     page_table.shape[1]))
    pool, head = k_cache, jnp.arange(kv_heads, dtype=jnp.int32)
  else:
    phys, pool = page_table, k_cache[:, :, None, :]
    head = jnp.zeros(page_table.shape[1], jnp.int32)
  phys = phys.astype(jnp.int32)
  logical = jnp.broadcast_to(jnp.arange(phys.shape[2], dtype=jnp.int32), phys.shape)
  if pages is not None:  # a page listed twice counts once
    logical = jnp.sort(pages.astype(jnp.int32), axis=2)
    repeat = jnp.concatenate([jnp.zeros_like(logical[..., :1], bool),
                              logical[..., 1:] == logical[..., :-1]], axis=2)
    logical = jnp.where(repeat, -1, logical)
    taken = jnp.take_along_axis(phys, jnp.maximum(logical, 0), axis=2)
    phys = jnp.where(logical >= 0, taken, -1)
  return pool, phys, logical, head


def _gather(pool, phys, head):
  """[batch, kv_heads, n * page_size, head_dim]: the pages `phys` (absent ones read page 0)."""
  pages = pool[jnp.maximum(phys, 0), :, head[None, :, None], :]  # [b, kv_heads, n, size, d]
  b, h, n, size, d = pages.shape
  return pages.reshape(b, h, n * size, d)


def _positions(phys, logical, page_size, absent):
  """int32[batch, kv_heads, n * page_size]: key positions, `absent` where no page is."""
  pos = logical[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)[None, None, None]
  pos = jnp.where((phys >= 0)[..., None], pos, absent)
  return pos.reshape(*phys.shape[:2], -1)


def _visible(mask, heads, kv_heads, lengths, q_tokens, kv_pos):
  """bool[batch, kv_heads or 1, groups or 1, q_tokens, kv]: causal within the cache, and the mask.

  `kv_pos` is int32[kv] or int32[batch, kv_heads, kv].
  """
  batch = lengths.shape[0]
  kv_pos = jnp.broadcast_to(kv_pos, (batch, 1, kv_pos.shape[-1])) if kv_pos.ndim == 1 else kv_pos
  q_pos = lengths[:, None] - q_tokens + jnp.arange(q_tokens)[None, :]  # [batch, q_tokens]
  qp, kp = q_pos[:, None, None, :, None], kv_pos[:, :, None, None, :]
  visible = (kp <= qp) & (qp >= 0)
  if mask is None:
    return visible
  if isinstance(mask, masks_lib.Mask):
    return visible & mask(qp, kp)
  groups = heads // kv_heads
  allowed = jnp.stack([m(q_pos[:, :, None], kv_pos[:, min(h // groups, kv_pos.shape[1] - 1)][:, None])
                       for h, m in enumerate(masks_lib.as_head_masks(mask, heads))], axis=1)
  return visible & allowed.reshape(batch, kv_heads, groups, q_tokens, -1)


def _attend(q, k, v, visible, sm_scale, *, kv_axis):
  """Attention over one set of keys: (out float32, lse float32[batch, heads, q_tokens]).

  `k`, `v` are [batch, kv, kv_heads, d] (``kv_axis=1``, a contiguous cache)
  or [batch, kv_heads, kv, d] (``kv_axis=2``, gathered pages). Query heads
  are grouped over their key head (GQA) instead of repeating the cache,
  which would copy it.
  """
  batch, q_tokens, heads, dim = q.shape
  kv_heads = k.shape[3 - kv_axis]
  kv = "bskd" if kv_axis == 1 else "bksd"
  qg = q.reshape(batch, q_tokens, kv_heads, heads // kv_heads, dim)
  s = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
  s = jnp.where(visible, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum(f"bkgts,{kv}->btkgd", p, v.astype(jnp.float32))
  return out.reshape(batch, q_tokens, heads, dim), lse.reshape(batch, heads, q_tokens)


def _split_map(part, num_splits):
  """(out, lse) of ``part(i)`` combined over ``i < num_splits`` (one call if 1)."""
  if num_splits == 1:
    return part(0)
  outs, lses = lax.map(part, jnp.arange(num_splits))
  return combine(outs, lses)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     *, page_table: jax.Array | None = None, pages: jax.Array | None = None,
                     mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None,
                     implementation: str | None = None, num_splits: int | None = None,
                     sm_scale: float | None = None, return_lse: bool = False,
                     interpret: bool | None = None):
  """Attention of the newest tokens of each sequence over its KV cache.

  Args:
    q: [batch, q_tokens, heads, head_dim], the last `q_tokens` cached
      positions of each sequence.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim]; with a 2-d
      `page_table` a pool [num_pages, page_size, kv_heads, head_dim]; with a
      3-d one a pool [num_pages, page_size, head_dim]. kv_heads divides
      heads (GQA/MQA).
    lengths: int[batch]: cached tokens per sequence, the new ones included.
    page_table: int[batch, pages_per_seq] or int[batch, kv_heads,
      pages_per_seq]: the pool pages of each sequence (and KV head) in
      order, -1 where a page is absent (None: a contiguous cache).
    pages: int[batch, kv_heads, num_selected]: attend only to these pages
      (indices into page_table's last dim, -1 for none; a page listed twice
      counts once), as `select_pages` chooses them.
    mask: a `Mask` or `MultiHeadMask` over (query position, key position)
      that restricts attention further (a local window, S2 shards, ...).
    implementation: "reference" (the whole cache at once), "xla" (split-KV
      in jnp), "pallas" (the Pallas kernel of the default backend:
      "pallas_triton" on GPU and in interpret mode on CPU, "pallas_tpu" on
      TPU), or None for the fastest available: the Pallas kernel on GPU and
      TPU where it tiles the cache and the mask (table masks, head_dim not
      a power of 2 on GPU fall back), "xla" elsewhere.
    num_splits: partitions of the cache attended in parallel and merged,
      dividing the cache's capacity (or the number of pages attended, for a
      paged cache). Default for "xla": one, or as many as keep each
      partition's scores under 2**24 entries; for the kernels: their own.
    sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.
    return_lse: also return the float32 log-sum-exp [batch, heads, q_tokens]
      (-inf where nothing is visible), for `combine`.
    interpret: run Pallas kernels in the interpreter; default True on CPU.

  Returns:
    [batch, q_tokens, heads, head_dim] in q's dtype (0 where nothing is
    visible), and the lse if `return_lse`.

  Example:
    >>> out = sja.decode_attention(q, k_cache, v_cache, lengths,
    ...                            mask=sja.LocalMask((T, T), (1024, 0)))
    >>> pages = sja.select_pages(q, cache, k_pages=64)        # Quest
    >>> out = sja.decode_attention(q, cache.k, cache.v, cache.lengths,
    ...                            page_table=cache.page_table, pages=pages)
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS} or None")
  _check(q, k_cache, v_cache, lengths, page_table, pages, mask, num_splits)
  if sm_scale is not None:
    _checks.static_float("sm_scale", sm_scale)
  sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
  call = functools.partial(_decode, q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32),
                           page_table, pages, mask=mask, num_splits=num_splits,
                           sm_scale=sm_scale, interpret=interpret)
  if implementation is None:
    implementation = _default_implementation(call)
  if implementation == "pallas":
    implementation = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  out, lse = call(implementation=implementation)
  return (out, lse) if return_lse else out


def _default_implementation(call) -> str:
  """The Pallas kernel on GPU and TPU where it tiles the cache and the mask, else "xla"."""
  if jax.default_backend() == "cpu":
    return "xla"
  kernel = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  try:  # the kernels check their tiles and masks while tracing
    jax.eval_shape(functools.partial(call, implementation=kernel))
  except ValueError:
    return "xla"
  return kernel


@functools.partial(jax.jit, static_argnames=("mask", "implementation", "num_splits", "sm_scale",
                                             "interpret"))
def _decode(q, k_cache, v_cache, lengths, page_table, pages, *, mask, implementation, num_splits,
            sm_scale, interpret):
  """`decode_attention` after its checks, jitted (one compile per shape, eager calls too)."""
  batch, q_tokens, heads, _ = q.shape
  capacity = (k_cache.shape[1] if page_table is None
              else page_table.shape[-1] * k_cache.shape[1])
  page_size = None if page_table is None else k_cache.shape[1]
  kv_heads = k_cache.shape[2] if page_table is None or page_table.ndim == 2 else page_table.shape[1]
  visible = lambda kv_pos: _visible(mask, heads, kv_heads, lengths, q_tokens, kv_pos)  # noqa: E731
  if implementation.startswith("pallas"):
    from sparsejax._src.attention import decode_pallas  # pylint: disable=g-import-not-at-top
    if page_table is None:  # a contiguous cache is a pool of its own pages, without a copy
      size = math.gcd(capacity, KERNEL_PAGE)
      k_cache = k_cache.reshape(batch * capacity // size, size, *k_cache.shape[2:])
      v_cache = v_cache.reshape(k_cache.shape)
      page_table = jnp.arange(k_cache.shape[0], dtype=jnp.int32).reshape(batch, capacity // size)
    k_pool, phys, logical, head = paged_view(k_cache, page_table, pages)
    v_pool = paged_view(v_cache, page_table, None)[0]
    out, lse = decode_pallas.decode(
        q, k_pool, v_pool, phys, logical, head, lengths, mask=mask, sm_scale=sm_scale,
        num_splits=num_splits, backend=implementation.removeprefix("pallas_"),
        interpret=interpret)
    return out.astype(q.dtype), lse
  if page_table is None:
    blocks, block = capacity, 1
  else:
    k_pool, phys, logical, head = paged_view(k_cache, page_table, pages)
    v_pool = paged_view(v_cache, page_table, None)[0]
    blocks, block = phys.shape[2], page_size
  if implementation == "reference" or batch == 0:
    num_splits = 1
  elif num_splits is None:
    scores = max(batch * heads * q_tokens * blocks * block, 1)
    num_splits = next((n for n in range(1, blocks + 1)
                       if blocks % n == 0 and scores // n <= _SCORES_PER_SPLIT), max(blocks, 1))
  size = blocks // num_splits

  if page_table is None:
    def part(i):
      k = lax.dynamic_slice_in_dim(k_cache, i * size, size, axis=1)
      v = lax.dynamic_slice_in_dim(v_cache, i * size, size, axis=1)
      return _attend(q, k, v, visible(i * size + jnp.arange(size)), sm_scale, kv_axis=1)
  else:
    def part(i):
      sl = lambda x: lax.dynamic_slice_in_dim(x, i * size, size, axis=2)  # noqa: E731
      kv_pos = _positions(sl(phys), sl(logical), page_size, capacity)
      k, v = _gather(k_pool, sl(phys), head), _gather(v_pool, sl(phys), head)
      return _attend(q, k, v, visible(kv_pos), sm_scale, kv_axis=2)

  out, lse = _split_map(part, num_splits)
  return out.astype(q.dtype), lse
