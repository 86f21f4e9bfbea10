"""The paged KV cache: pruning by decode-time patterns, Quest page selection and its recall."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja

T, HEADS, KV_HEADS, DIM, PAGE = 128, 4, 2, 16, 8


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


def sequence(seed, batch=2, kv_heads=KV_HEADS):
  rng = np.random.default_rng(seed)
  return (normal(rng, batch, T, HEADS, DIM), normal(rng, batch, T, kv_heads, DIM),
          normal(rng, batch, T, kv_heads, DIM))


PATTERNS = {
    "local": sja.LocalMask((T, T), (20, 0)),
    "ashape": sja.AShapeMask((T, T), 8, 24),
    "chunked": sja.ChunkedCausalMask((T, T), 32),
    "s2": sja.StridedShardMask.for_heads((T, T), HEADS, block=PAGE, num_shards=4,
                                         local_window=PAGE),
    "local|shards": sja.LocalMask((T, T), (16, 0)) | sja.StridedShardMask((T, T), 16, 4, 1),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pruned_cache_decodes_like_the_full_cache(name):
  """Token by token under jit: a cache that drops what the pattern cannot read decodes the same.

  The prompt is appended in one call; the pool is smaller than a dense cache
  needs, so decoding only works if pages are really freed and reused.
  """
  mask, kv_heads = PATTERNS[name], (HEADS if name == "s2" else KV_HEADS)
  q, k, v = sequence(0, kv_heads=kv_heads)
  batch, prompt = q.shape[0], 40
  dense_pages = batch * kv_heads * T // PAGE
  pool = {"local": 28, "ashape": 24, "chunked": 40, "s2": 96, "local|shards": 40}[name]
  assert pool < dense_pages
  cache = sja.init_cache(batch, kv_heads, DIM, page_size=PAGE, max_len=T, num_pages=pool)
  cache = sja.append(cache, k[:, :prompt], v[:, :prompt], mask=mask)

  @jax.jit
  def step(cache, t):
    cache = sja.append(cache, lax_slice(k, t), lax_slice(v, t), mask=mask)
    args = (lax_slice(q, t), cache.k, cache.v, cache.lengths)
    got = sja.decode_attention(*args, page_table=cache.page_table, mask=mask)
    only = sja.decode_attention(*args, page_table=cache.page_table, mask=mask,  # 8 of 16 pages
                                pages=sja.present_pages(cache, k_pages=8))
    return cache, (got, only, sja.kv_bytes(cache))

  cache, (got, only, used) = jax.lax.scan(step, cache, jnp.arange(prompt, T))
  want = jax.vmap(lambda t: sja.decode_attention(
      lax_slice(q, t), k, v, jnp.full((batch,), t + 1), mask=mask, implementation="reference"))(
          jnp.arange(prompt, T))
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(only, want, atol=2e-5, rtol=2e-5)
  assert int(cache.dropped.sum()) == 0
  dense_bytes = 2 * batch * T * kv_heads * DIM * 4
  assert int(used.max()) <= pool * 2 * PAGE * DIM * 4 < dense_bytes
  # The pages kept are exactly those holding a key some future query reads.
  need = sja.kv_needed(mask, jnp.arange(T), query_position=cache.lengths - 1, num_heads=len(
      mask) if isinstance(mask, sja.MultiHeadMask) else kv_heads)
  need = need.reshape(batch, kv_heads, -1, T // PAGE, PAGE).any((2, 4))
  np.testing.assert_array_equal(cache.page_table >= 0, need)


def test_prefill_keeps_only_what_later_queries_read():
  """A 100-token prompt appended with prefill=True fits a pool a tenth of dense."""
  mask = PATTERNS["local"]
  q, k, v = sequence(6)
  cache = sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T, num_pages=16)
  cache = sja.append(cache, k[:, :100], v[:, :100], mask=mask, prefill=True)
  assert int((cache.page_table >= 0).sum()) == 2 * KV_HEADS * 3  # keys 80..99
  for t in (100, 101):
    cache = sja.append(cache, k[:, t:t + 1], v[:, t:t + 1], mask=mask)
    got = sja.decode_attention(q[:, t:t + 1], cache.k, cache.v, cache.lengths,
                               page_table=cache.page_table, mask=mask)
    want = sja.decode_attention(q[:, t:t + 1], k, v, jnp.full((2,), t + 1), mask=mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def lax_slice(x, t):
  return jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)


def test_kv_needed_matches_the_mask():
  """A key is needed at position p iff some query at p or later reads it (checked by brute force)."""
  more = {"local offset/right": sja.LocalMask((T, T), (12, 3), offset=-4),
          "ashape, no sink": sja.AShapeMask((T, T), 0, 10),
          "chunks of 5": sja.ChunkedCausalMask((T, T), 5),
          "s2, not causal": sja.StridedShardMask((T, T), 8, 3, 2, local_window=6, causal=False),
          "s2, no window": sja.StridedShardMask((T, T), 8, 3, 0),
          "local & causal": sja.LocalMask((T, T), (30, 0)) & sja.CausalMask((T, T))}
  for name, mask in {**PATTERNS, **more}.items():
    heads = len(mask) if isinstance(mask, sja.MultiHeadMask) else 1
    dense = np.stack([m.to_numpy() for m in (mask.masks if heads > 1 else [mask])])
    positions = np.array([0, 5, 37, 64, 100])
    got = np.asarray(sja.kv_needed(mask, jnp.arange(T), query_position=positions, num_heads=heads))
    assert got.shape == (5, heads, T)
    for i, p in enumerate(positions):
      want = dense[:, p:].any(axis=1) & (np.arange(T) < p)
      np.testing.assert_array_equal(got[i][:, :p], want[:, :p], err_msg=f"{name} at {p}")
  # Masks without a rule for it keep every key.
  bigbird = sja.BigBirdMask((T, T), block=16, causal=True)
  keep = sja.kv_needed(bigbird, jnp.arange(T), query_position=jnp.array([90, 3]), num_heads=2)
  assert keep.shape == (2, 2, T) and bool(keep.all())


def paged(seed, batch=2, length=T):
  q, k, v = sequence(seed, batch)
  cache = sja.init_cache(batch, KV_HEADS, DIM, page_size=PAGE, max_len=T)
  return q[:, length - 1:length], k[:, :length], v[:, :length], sja.append(
      cache, k[:, :length], v[:, :length])


def test_paged_cache_and_chosen_pages_equal_the_reference():
  """The cache equals the contiguous keys; choosing pages equals dropping the others."""
  q, k, v, cache = paged(1, length=100)
  lengths = jnp.full((2,), 100)
  want = sja.decode_attention(q, k, v, lengths, implementation="reference")
  args = (q, cache.k, cache.v, cache.lengths)
  for impl in ("reference", "xla"):
    got = sja.decode_attention(*args, page_table=cache.page_table, implementation=impl)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  pages = sja.select_pages(q, cache, k_pages=5)
  assert pages.shape == (2, KV_HEADS, 5) and int((pages == 12).any(-1).sum()) == 4  # newest page
  chosen = jnp.zeros(cache.page_table.shape, bool).at[
      jnp.arange(2)[:, None, None], jnp.arange(KV_HEADS)[None, :, None], pages].set(True)
  dropped = jnp.where(chosen, cache.page_table, -1)
  want = sja.decode_attention(*args, page_table=dropped, implementation="reference")
  for impl, splits in (("reference", None), ("xla", 1), ("xla", 5)):
    got = jax.jit(lambda p, impl=impl, s=splits: sja.decode_attention(
        *args, page_table=cache.page_table, pages=p, implementation=impl, num_splits=s))(pages)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_select_pages_finds_planted_pages_and_recall():
  """Keys aligned with the query on 3 planted pages: Quest picks them and holds most mass."""
  q, k, v, _ = paged(2, length=T)
  planted = [2, 7, 11]
  k = k.at[:, [p * PAGE + 3 for p in planted]].add(4.0 * jnp.repeat(q[:, :, ::2], 3, axis=1))
  cache = sja.append(sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T), k, v)
  pages = jax.jit(lambda q, c: sja.select_pages(q, c, k_pages=4))(q, cache)
  for p in planted + [T // PAGE - 1]:  # and the newest
    assert bool((pages == p).any(-1).all()), (p, pages)
  recall = sja.page_recall(q, cache, pages)
  assert recall.shape == (2, HEADS, 1) and float(recall[:, ::2].min()) > 0.9  # planted heads
  few = sja.page_recall(q, cache, jnp.full((2, KV_HEADS, 4), -1).at[..., 0].set(0))
  assert float(few.max()) < 0.5
  every = sja.select_pages(q, cache, k_pages=T // PAGE)
  np.testing.assert_allclose(sja.page_recall(q, cache, every), 1.0, atol=1e-6)


def test_select_pages_skips_absent_pages_and_the_future():
  q, _, _, cache = paged(3, length=30)  # pages 0-3 hold keys
  pages = sja.select_pages(q, cache, k_pages=6)
  assert np.asarray(pages)[..., :4].tolist() == [[[0, 1, 2, 3]] * KV_HEADS] * 2
  np.testing.assert_array_equal(np.asarray(pages)[..., 4:], -1)
  empty = sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T)
  np.testing.assert_array_equal(sja.select_pages(q, empty, k_pages=2), -1)
  out = sja.decode_attention(q, empty.k, empty.v, empty.lengths, page_table=empty.page_table,
                             pages=sja.select_pages(q, empty, k_pages=2))
  np.testing.assert_array_equal(out, 0.0)


def test_pruned_pages_are_never_selected_and_repeats_count_once():
  """Quest on a pruned cache (or under its mask) picks only pages the pattern keeps."""
  mask = PATTERNS["ashape"]
  q, k, v = sequence(7)
  cache = sja.append(sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T),
                     k[:, :100], v[:, :100], mask=mask, prefill=True)
  q = q[:, 99:100]
  assert int((cache.page_table >= 0).sum(-1).min()) == 5  # page 0 and keys 77..99
  pages = np.asarray(sja.select_pages(q, cache, k_pages=7))
  kept = np.asarray(cache.page_table >= 0)
  for b, h in np.ndindex(2, KV_HEADS):
    chosen = pages[b, h][pages[b, h] >= 0]
    assert len(chosen) == 5 and kept[b, h, chosen].all()
  full = sja.append(sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T),
                    k[:, :100], v[:, :100])
  np.testing.assert_array_equal(sja.select_pages(q, full, k_pages=7, mask=mask), pages)
  args = (q, full.k, full.v, full.lengths)
  once = sja.decode_attention(*args, page_table=full.page_table, pages=jnp.asarray(pages))
  twice = sja.decode_attention(*args, page_table=full.page_table,
                               pages=jnp.asarray(np.concatenate([pages, pages[..., :1]], -1)))
  np.testing.assert_allclose(twice, once, atol=2e-6)


def test_overflow_is_counted_and_the_cache_donates():
  q, k, v = sequence(8)
  small = sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=32)
  over = jax.jit(sja.append)(small, k[:, :40], v[:, :40])  # 8 tokens past the capacity
  assert over.dropped.tolist() == [8, 8]
  step = jax.jit(sja.append, donate_argnums=0)
  cache = step(small, k[:, :4], v[:, :4])
  cache = step(cache, k[:, 4:5], v[:, 4:5])
  assert cache.lengths.tolist() == [5, 5] and cache.k is not cache.v


def test_full_pool_and_bad_input():
  q, k, v = sequence(4)
  small = sja.init_cache(2, KV_HEADS, DIM, page_size=PAGE, max_len=T, num_pages=6)
  with pytest.raises(ValueError, match="the pool of 6 pages is full"):
    sja.append(small, k[:, :40], v[:, :40])
  full = jax.jit(sja.append)(small, k[:, :40], v[:, :40])  # inside jit: counted
  assert full.dropped.tolist() == [32, 40]  # pages go to sequence 0's first KV head first
  _, _, _, cache = paged(5)
  with pytest.raises(ValueError, match="k_pages=17 is more than the 16 pages"):
    sja.select_pages(q[:, :1], cache, k_pages=17)
  with pytest.raises(ValueError, match="pages selects 17 pages of sequences that have 16"):
    sja.decode_attention(q[:, :1], cache.k, cache.v, cache.lengths,
                         page_table=cache.page_table, pages=jnp.zeros((2, KV_HEADS, 17), int))
  with pytest.raises(ValueError, match=r"pages must index page_table's last dim \(0..15"):
    sja.decode_attention(q[:, :1], cache.k, cache.v, cache.lengths,
                         page_table=cache.page_table, pages=jnp.full((2, KV_HEADS, 2), 16))
  with pytest.raises(ValueError, match="pages needs a paged cache"):
    sja.decode_attention(q[:, :1], k, v, cache.lengths, pages=jnp.zeros((2, KV_HEADS, 2), int))
  with pytest.raises(ValueError, match=r"appending 1 tokens overflows the capacity 128"):
    sja.append(cache, k[:, :1], v[:, :1])
  with pytest.raises(ValueError, match="k and v must be"):
    sja.append(small, k[:, :1, :1], v[:, :1, :1])
  with pytest.raises(ValueError, match="mask has 4 heads; it must be a multiple of the cache's "
                                       "kv_heads=3"):
    sja.append(sja.init_cache(2, 3, DIM, page_size=PAGE, max_len=T), k[:, :1, :1].repeat(3, 2),
               v[:, :1, :1].repeat(3, 2), mask=PATTERNS["s2"])
  with pytest.raises(ValueError, match="lengths must be an int array, got list"):
    sja.decode_attention(q[:, :1], k, v, [1, 2])
  with pytest.raises(ValueError, match="q must be a floating-point array, got int32"):
    sja.decode_attention(q[:, :1].astype(jnp.int32), k, v, jnp.array([1, 2]))
  with pytest.raises(ValueError, match="cache must be a sja.KVCache"):
    sja.present_pages((k, v), k_pages=2)
  with pytest.raises(ValueError, match="prefill must be a Python bool"):
    sja.append(small, k[:, :1], v[:, :1], prefill=jnp.bool_(True))
  with pytest.raises(ValueError, match="page_size=7 must divide max_len=128"):
    sja.init_cache(2, KV_HEADS, DIM, page_size=7, max_len=T)
