"""The XLA path of block-sparse attention: bounded temporaries, chunks and pair-list sizes.

The shared correctness tests (every implementation against the reference,
with and without segment ids, score_mod and sinks) are in attention_test.py
and attention_mods_test.py; these check what only the XLA path does: it runs
long pair lists in chunks so its compiled temporaries stay within dense
attention's, and sizes the pair lists of a segment-derived layout by the
static bound of its base.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja
from sparsejax._src.attention import xla

TOLERANCE = 2e-4


def inputs(seed, batch, t, heads, kv_heads, dim):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
  return (normal(batch, t, heads, dim), normal(batch, t, kv_heads, dim),
          normal(batch, t, kv_heads, dim), normal(batch, t, heads, dim))


def documents(seed, batch, t, mean_length):
  """int32[batch, t]: sorted ids of packed documents, two or more per row."""
  starts = np.random.default_rng(seed).random((batch, t)) < 1.0 / mean_length
  starts[:, 0], starts[:, t // 2] = False, True
  return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def temp_bytes(fn, *shapes):
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_and_backward"])
def test_temporaries_within_dense_attention(backward):
  """Causal with 16x16 blocks at T=2048: the per-pair blocks used to need 3x dense's bytes."""
  t = 2048
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=1, block_q=16, block_kv=16)
  sparse = lambda q, k, v: sja.block_sparse_attention(  # noqa: E731
      q, k, v, layout, implementation="xla")
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
  if backward:
    sparse, dense = (jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2))
                     for f in (sparse, dense))
  shape = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
  assert temp_bytes(sparse, shape, shape, shape) <= temp_bytes(dense, shape, shape, shape)


def test_chunks_match_the_reference():
  """Documents, a captured ALiBi table and sinks over a pair list long enough to run in chunks."""
  t, heads, dim = 1024, 2, 16
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=heads, block_q=16, block_kv=16)
  pairs = int(layout.num_kv.sum(-1).max())
  assert xla._chunking(pairs, 16, 16, dim, t, t)[0] > 1  # pylint: disable=protected-access
  q, k, v, ct = inputs(0, 2, t, heads, 1, dim)
  ids = documents(0, 2, t, 200)

  def loss(impl, q, k, v, slopes, sinks):
    out = sja.block_sparse_attention(
        q, k, v, layout, q_segment_ids=ids, sinks=sinks, implementation=impl,
        score_mod=lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j) / 64)
    return jnp.sum(out * ct), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
  args = (q, k, v, jnp.array([0.5, 0.25]), jnp.array([0.3, -0.3]))
  got, out = grad("xla", *args)
  want, ref = grad("reference", *args)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  np.testing.assert_allclose(out, ref, atol=TOLERANCE, rtol=TOLERANCE)
  for g, w in zip(got, want):
    assert g.shape == w.shape and float(jnp.abs(w).max()) > 0
    scale = max(float(jnp.abs(w).max()), 1.0)
    np.testing.assert_allclose(g, w, atol=TOLERANCE * scale, rtol=TOLERANCE)


def test_chunks_forward_mode():
  t, dim = 1024, 16
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=1, block_q=16, block_kv=16)
  q, k, v, _ = inputs(1, 1, t, 1, 1, dim)
  tangents = inputs(2, 1, t, 1, 1, dim)[:3]
  attend = lambda impl: jax.jit(lambda q, k, v: sja.block_sparse_attention(  # noqa: E731
      q, k, v, layout, sinks=jnp.array([0.5]), implementation=impl))
  _, got = jax.jvp(attend("xla"), (q, k, v), tangents)
  _, want = jax.jvp(attend("reference"), (q, k, v), tangents)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE)


def test_segment_layout_pairs_sized_by_the_base_bound():
  """The traced segment-derived layout's pair lists hold the base's most pairs, not nq * max_kv."""
  t, heads, block, batch = 96, 2, 16, 2
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=heads, block_q=block,
                           block_kv=block)
  nq = t // block
  bound = int(layout.num_kv.sum(-1).max())
  assert (bound, nq * layout.kv_index.shape[-1]) == (21, 36)
  q, k, v, _ = inputs(3, batch, t, heads, heads, 16)
  ids = documents(1, batch, t, 24)

  def attend(impl, q, k, v, ids):
    return sja.block_sparse_attention(q, k, v, layout, q_segment_ids=ids, implementation=impl,
                                      score_mod=lambda s, b, h, i, j: 2.0 * jnp.tanh(s / 2.0))

  jaxpr = str(jax.make_jaxpr(lambda *a: attend("xla", *a))(q, k, v, ids))
  # The pair lists of each (batch, head) in chunks (the ones past its count skipped).
  chunks, per_chunk = xla._chunking(bound, block, block, 16, t, t, traced=True)  # pylint: disable=protected-access
  assert chunks * per_chunk < nq * layout.kv_index.shape[-1]
  assert f"i32[{chunks},{per_chunk}]" in jaxpr and f"i32[{nq * nq}]" not in jaxpr
  assert "cond[" in jaxpr
  got = jax.jit(attend, static_argnums=0)("xla", q, k, v, ids)
  want = jax.jit(attend, static_argnums=0)("reference", q, k, v, ids)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE)
