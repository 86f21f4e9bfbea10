"""Decode attention over a KV cache: split-KV against the reference and the prefill path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja

T, HEADS, KV_HEADS, DIM = 64, 4, 2, 16


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


def cache(seed, batch=3, q_tokens=2):
  rng = np.random.default_rng(seed)
  return (normal(rng, batch, q_tokens, HEADS, DIM), normal(rng, batch, T, KV_HEADS, DIM),
          normal(rng, batch, T, KV_HEADS, DIM))


@pytest.mark.parametrize("mask", [None, "local", "shards"])
def test_decode_equals_prefill_at_the_same_positions(mask):
  """With the whole cache in use, decode is the last rows of causal prefill attention."""
  rng = np.random.default_rng(0)
  q_all = normal(rng, 2, T, HEADS, DIM)
  k, v = normal(rng, 2, T, KV_HEADS, DIM), normal(rng, 2, T, KV_HEADS, DIM)
  causal = sja.CausalMask((T, T))
  masks = {None: None, "local": sja.LocalMask((T, T), (9, 0)),
           "shards": sja.StridedShardMask.for_heads((T, T), HEADS, block=8, num_shards=2,
                                                    local_window=4)}
  extra = masks[mask]
  if extra is None:
    full = causal
  elif isinstance(extra, sja.MultiHeadMask):
    full = sja.MultiHeadMask([causal & m for m in extra.masks])
  else:
    full = causal & extra
  layout = sja.make_layout(full, num_heads=HEADS, block_q=16, block_kv=16)
  want = sja.block_sparse_attention(q_all, k, v, layout, implementation="reference")[:, -3:]
  for impl in ("reference", "xla"):
    got = jax.jit(lambda q, k, v, n, impl=impl: sja.decode_attention(
        q, k, v, n, mask=extra, implementation=impl, num_splits=4))(
            q_all[:, -3:], k, v, jnp.full((2,), T))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_split_kv_equals_reference_for_any_lengths():
  """Per-sequence lengths, 0 and 1 included; a row with no visible key gets 0."""
  q, k, v = cache(1)
  lengths = jnp.array([0, 1, 37])
  want, want_lse = sja.decode_attention(q, k, v, lengths, implementation="reference",
                                        return_lse=True)
  assert float(jnp.abs(want[2]).max()) > 0.1
  np.testing.assert_array_equal(np.asarray(want[0]), 0.0)  # nothing cached
  np.testing.assert_array_equal(np.asarray(want[1, 0]), 0.0)  # its position is -1
  assert bool(jnp.all(jnp.isneginf(want_lse[0])))
  for splits in (1, 4, 16):
    got, lse = jax.jit(lambda q, k, v, n, s=splits: sja.decode_attention(
        q, k, v, n, num_splits=s, return_lse=True))(q, k, v, lengths)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_paged_cache_equals_contiguous_cache():
  """A pool of 8-token pages in a scrambled order reads like the contiguous cache."""
  q, k, v = cache(2)
  page, batch = 8, 3
  pages = T // page
  order = np.random.default_rng(0).permutation(batch * pages).reshape(batch, pages)
  k_pool = jnp.zeros((batch * pages + 2, page, KV_HEADS, DIM))  # spare pages: never read
  v_pool = jnp.zeros_like(k_pool)
  k_pool = k_pool.at[order.reshape(-1)].set(k.reshape(batch * pages, page, KV_HEADS, DIM))
  v_pool = v_pool.at[order.reshape(-1)].set(v.reshape(batch * pages, page, KV_HEADS, DIM))
  lengths = jnp.array([5, 64, 30])
  mask = sja.LocalMask((T, T), (20, 0))
  want = sja.decode_attention(q, k, v, lengths, mask=mask, implementation="reference")
  for impl in ("reference", "xla"):
    got = sja.decode_attention(q, k_pool, v_pool, lengths, page_table=jnp.asarray(order),
                               mask=mask, implementation=impl)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_combine_merges_disjoint_key_sets():
  """Attention over all keys equals `combine` of the halves, each with its lse."""
  q, k, v = cache(3, batch=2)
  n = jnp.full((2,), T)
  want = sja.decode_attention(q, k, v, n, implementation="reference")
  halves = []
  for lo in (0, T // 2):
    mask = sja.LocalMask((T, T), (None, None)) & sja.NumpyMask(
        np.broadcast_to((np.arange(T) >= lo) & (np.arange(T) < lo + T // 2), (T, T)).copy())
    halves.append(sja.decode_attention(q, k, v, n, mask=mask, implementation="reference",
                                       return_lse=True))
  out, _ = sja.combine(jnp.stack([h[0] for h in halves]), jnp.stack([h[1] for h in halves]))
  assert not np.allclose(halves[0][0], want, atol=1e-2)  # each half alone differs
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_bad_input():
  q, k, v = cache(4)
  n = jnp.array([1, 2, 3])
  with pytest.raises(ValueError, match=r"lengths must be in \[0, 64\]"):
    sja.decode_attention(q, k, v, jnp.array([1, 2, 65]))
  with pytest.raises(ValueError, match=r"lengths must be int\[batch=3\]"):
    sja.decode_attention(q, k, v, n[:2])
  with pytest.raises(ValueError, match="page_table holds pages outside the pool of 64 pages"):
    sja.decode_attention(q, k[0][:, None], v[0][:, None], n, page_table=jnp.full((3, 2), 64))
  with pytest.raises(ValueError, match=r"num_splits=3 must be a positive int dividing"):
    sja.decode_attention(q, k, v, n, num_splits=3)
  with pytest.raises(ValueError, match="it must cover the cache's capacity 64"):
    sja.decode_attention(q, k, v, n, mask=sja.CausalMask((32, 32)))
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    sja.decode_attention(q, k, v, n, implementation="cuda")


@pytest.mark.parametrize("dim,mask,want", [(16, None, "pallas_triton"),
                                           (24, None, "xla"),  # not a Triton tile
                                           (16, "table", "xla")])  # a table mask
def test_default_falls_back_to_xla_where_the_kernel_cannot_run(monkeypatch, dim, mask, want):
  """On a GPU the default is the Triton kernel, unless it cannot tile the cache or the mask."""
  from sparsejax._src.attention import decode  # pylint: disable=g-import-not-at-top
  q, k, v = (x[..., :dim] if dim <= DIM else jnp.concatenate([x, x[..., :dim - DIM]], -1)
             for x in cache(5))
  if mask == "table":
    mask = sja.NumpyMask(np.tril(np.ones((T, T), bool)))
  monkeypatch.setattr(decode.jax, "default_backend", lambda: "gpu")
  call = functools.partial(decode._decode, q, k, v, jnp.full((3,), T), None, None, mask=mask,  # pylint: disable=protected-access
                           num_splits=None, sm_scale=1.0, interpret=True)
  assert decode._default_implementation(call) == want  # pylint: disable=protected-access
