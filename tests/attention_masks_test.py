"""Attention masks and layouts: NumPy and traced evaluation agree, layouts are exact."""

import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja

T = 64

MASKS = {
    "full": sja.FullMask((T, T)),
    "causal": sja.CausalMask((T, T)),
    "causal_offset": sja.CausalMask((T, T), offset=-3),
    "local": sja.LocalMask((T, T), window=(5, 2)),
    "local_left_only": sja.LocalMask((T, T), window=(None, 0)),
    "chunked": sja.ChunkedCausalMask((T, T), chunk=12),
    "a_shape": sja.AShapeMask((T, T), sink=4, window=8),
    "shard": sja.StridedShardMask((T, T), block=8, num_shards=4, shard=1, local_window=6),
    "bigbird": sja.BigBirdMask((T, T), block=8, num_global=1, window=1, num_random=2, seed=3),
    "vertical_slash": sja.VerticalSlashMask((T, T), vertical=(0, 5, 40), slash=(0, 1, 17)),
    "numpy": sja.NumpyMask(np.random.default_rng(0).random((T, T)) < 0.3),
    "combined": sja.CausalMask((T, T)) & (sja.LocalMask((T, T), (8, 0))
                                          | sja.AShapeMask((T, T), sink=2, window=1)),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_numpy_and_traced_evaluation_agree(name):
  mask = MASKS[name]
  host = mask.to_numpy()
  assert host.shape == (T, T) and host.dtype == bool
  traced = jax.jit(lambda q, k: mask(q, k))(jnp.arange(T)[:, None], jnp.arange(T)[None, :])
  np.testing.assert_array_equal(np.asarray(traced), host)
  np.testing.assert_array_equal(mask[10:20, 30:50], host[10:20, 30:50])


def test_mask_semantics():
  q, k = np.arange(T)[:, None], np.arange(T)[None, :]
  np.testing.assert_array_equal(MASKS["causal"].to_numpy(), k <= q)
  np.testing.assert_array_equal(MASKS["local"].to_numpy(), (k >= q - 5) & (k <= q + 2))
  np.testing.assert_array_equal(MASKS["chunked"].to_numpy(), (q // 12 == k // 12) & (k <= q))
  np.testing.assert_array_equal(MASKS["a_shape"].to_numpy(), (k <= q) & ((k < 4) | (q - k < 8)))
  vs = MASKS["vertical_slash"].to_numpy()
  assert vs[50, 40] and vs[50, 33] and vs[50, 49] and not vs[50, 48] and not vs[10, 40]


def test_composition_hash_and_bool():
  a = sja.CausalMask((T, T)) & sja.LocalMask((T, T), (4, 0))
  b = sja.CausalMask((T, T)) & sja.LocalMask((T, T), (4, 0))
  assert a == b and hash(a) == hash(b)
  assert sja.BigBirdMask((T, T), block=8, seed=1) == sja.BigBirdMask((T, T), block=8, seed=1)
  assert sja.NumpyMask(np.eye(T, dtype=bool)) == sja.NumpyMask(np.eye(T, dtype=bool))
  with pytest.raises(ValueError, match="no truth value"):
    bool(a)
  with pytest.raises(ValueError, match="mask shapes differ"):
    sja.CausalMask((T, T)) | sja.CausalMask((T, 2 * T))
  with pytest.raises(ValueError, match=r"window=\(-1, 0\)"):
    sja.LocalMask((T, T), (-1, 0))


def test_strided_shards_cover_the_causal_context():
  n, heads, shards, block, local = 512, 8, 4, 16, 16
  multi = sja.StridedShardMask.for_heads((n, n), heads, block=block, num_shards=shards,
                                         local_window=local)
  union = np.zeros((n, n), bool)
  causal = np.tril(np.ones((n, n), bool))
  for h in range(heads):
    m = multi[h].to_numpy()
    union |= m
    assert not np.any(m & ~causal)
    # About one shard of the causal context, plus the local window.
    density = m.sum() / causal.sum()
    assert 1 / shards - 0.05 < density < 1 / shards + 2 * local / n + 0.05, density
  np.testing.assert_array_equal(union, causal)


_dense_mask = jax.jit(sja.dense_mask)  # one compile per layout shape, not per eager op


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    block_q=st.sampled_from([8, 16, 32]), block_kv=st.sampled_from([8, 16, 32]),
    density=st.floats(0.0, 1.0), blockiness=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_layout_is_exact(block_q, block_kv, density, blockiness, seed):
  rng = np.random.default_rng(seed)
  shape = (2 * 32, 3 * 32)
  # Whole blocks on or off, then some entries flipped: full, partial and empty blocks.
  blocks = rng.random((shape[0] // block_q, shape[1] // block_kv)) < density
  array = np.kron(blocks, np.ones((block_q, block_kv), bool))
  array ^= rng.random(shape) < 0.05 * (1 - blockiness)
  mask = sja.NumpyMask(array)
  layout = sja.make_layout(mask, num_heads=2, block_q=block_q, block_kv=block_kv)
  tiles = array.reshape(shape[0] // block_q, block_q, shape[1] // block_kv, block_kv)
  active = tiles.any(axis=(1, 3))
  np.testing.assert_array_equal(np.asarray(layout.num_kv)[0], active.sum(1))
  np.testing.assert_array_equal(np.asarray(layout.num_q)[0], active.sum(0))
  kv_index = np.asarray(layout.kv_index)  # indexed on the host: no compile per slice
  for i in range(active.shape[0]):
    np.testing.assert_array_equal(kv_index[0, i, :active[i].sum()], np.nonzero(active[i])[0])
  np.testing.assert_array_equal(np.asarray(_dense_mask(layout))[0], array)
  assert layout.head_row.shape == (1, 2) and int(layout.head_row.max()) == 0  # shared row


def test_layout_is_cached_and_heads_share_rows():
  mask = sja.CausalMask((T, T))
  assert sja.make_layout(mask, num_heads=4, block_q=16, block_kv=16) is sja.make_layout(
      sja.CausalMask((T, T)), num_heads=4, block_q=16, block_kv=16)
  multi = sja.MultiHeadMask([mask, sja.LocalMask((T, T), (8, 8)), mask])
  layout = sja.make_layout(multi, num_heads=3, block_q=16, block_kv=16)
  np.testing.assert_array_equal(layout.head_row, [[0, 1, 0]])
  assert layout.partial.shape[1:] == (16, 16) and layout.partial.shape[0] >= 2


def test_layout_bad_input():
  with pytest.raises(ValueError, match="q_len=64 must be a multiple of block_q=24"):
    sja.make_layout(sja.CausalMask((T, T)), num_heads=1, block_q=24, block_kv=16)
  with pytest.raises(ValueError, match="the mask has 2 heads, expected num_heads=4"):
    sja.make_layout(sja.MultiHeadMask([sja.CausalMask((T, T))] * 2), num_heads=4)


def test_topk_layout_routes_by_pooled_scores():
  rng = np.random.default_rng(0)  # host values: jax.random.normal compiles per shape
  q = jnp.asarray(rng.standard_normal((2, T, 4, 8), np.float32))
  k = jnp.asarray(rng.standard_normal((2, T, 2, 8), np.float32))
  layout = jax.jit(lambda q, k: sja.topk_layout(q, k, block_q=16, block_kv=16, k_blocks=2))(q, k)
  assert layout.head_row.shape == (2, 4) and layout.kv_index.shape == (8, 4, 2)
  np.testing.assert_array_equal(layout.num_kv, 2)
  pq = np.asarray(q).reshape(2, 4, 16, 4, 8).mean(2)
  pk = np.repeat(np.asarray(k).reshape(2, 4, 16, 2, 8).mean(2), 2, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", pq, pk)
  best = np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :2], axis=-1)
  np.testing.assert_array_equal(np.asarray(layout.kv_index).reshape(2, 4, 4, 2), best)
  causal = sja.topk_layout(q, k, block_q=16, block_kv=16, k_blocks=3, causal=True)
  dense = np.asarray(_dense_mask(causal))
  assert not np.any(dense & ~np.tril(np.ones((T, T), bool)))
  assert np.all(np.diagonal(dense, axis1=1, axis2=2))  # the diagonal block is always read
  with pytest.raises(ValueError, match=re.escape("k_blocks=9 must be in [1, 4]")):
    sja.topk_layout(q, k, block_q=16, block_kv=16, k_blocks=9)
