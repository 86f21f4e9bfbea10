"""The Pallas decode kernels (Triton and Mosaic) against the reference, and their lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja
from sparsejax._src.attention import decode
from sparsejax._src.attention import decode_pallas_gpu
from sparsejax._src.attention import decode_pallas_pages as pages_lib
from sparsejax._src.attention import decode_pallas_tpu

from kernel_testing import export_mlir  # pylint: disable=g-bad-import-order

HEADS, PAGE, SMALL_DIM = 4, 16, 16
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
LSE_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1e-3}


def normal(rng, *shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


def shards(t):
  """S2 heads: query heads 0 and 1 of a KV head read different shards (two masks per tile)."""
  return sja.StridedShardMask.for_heads((t, t), HEADS, block=PAGE, num_shards=2, local_window=8)


def filled_cache(rng, batch, kv_heads, max_len, tokens, mask=None):
  """A `KVCache` (pages of one KV head each) after appending `tokens` random tokens at once
  (or, a list, in steps: a mask then frees the pages later tokens cannot read)."""
  cache = sja.init_cache(batch, kv_heads, SMALL_DIM, page_size=PAGE, max_len=max_len)
  append = jax.jit(functools.partial(sja.append, mask=mask))
  for new in np.atleast_1d(tokens):
    k, v = (normal(rng, batch, int(new), kv_heads, SMALL_DIM) for _ in range(2))
    cache = append(cache, k, v)
  return cache


@functools.cache
def absent_pages_case():
  """q (3 new tokens) and a cache of 100 tokens appended under an A-shape mask, in two steps."""
  rng = np.random.default_rng(2)
  mask = sja.AShapeMask((128, 128), 8, 24)
  return normal(rng, 2, 3, HEADS, SMALL_DIM), filled_cache(rng, 2, 2, 128, [80, 20], mask), mask


@functools.cache
def selected_pages_case():
  """q (1 new token), a full cache of 120 tokens and Quest's 3 pages per KV head."""
  rng = np.random.default_rng(3)
  cache = filled_cache(rng, 2, 2, 128, 120)
  q = normal(rng, 2, 1, HEADS, SMALL_DIM)
  return q, cache, sja.select_pages(q, cache, k_pages=3)


class TestPallasTriton:
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  DIM = SMALL_DIM  # head_dim where pages hold several KV heads (a 2-d table, a contiguous cache)

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Triton kernels need a GPU; the Interpret class runs them on CPU")

  def check(self, args, dtype=jnp.float32, **kw):
    """The kernel equals the reference (values and lse) under jit; returns the reference."""
    run = lambda impl, interpret=None: jax.jit(functools.partial(  # noqa: E731
        sja.decode_attention, implementation=impl, interpret=interpret, return_lse=True,
        **kw))(*args)
    want, want_lse = run("reference")
    got, lse = run(self.IMPLEMENTATION, self.INTERPRET)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    assert lse.shape == want_lse.shape and lse.dtype == want_lse.dtype == jnp.float32
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))  # rows that see none
    tol = LSE_TOLERANCE[dtype]
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)
    return np.asarray(want, np.float32), np.asarray(want_lse)

  def test_contiguous_cache(self):
    """GQA (4 heads over 2), 3 new tokens, lengths 0, 1 and a partial page, two splits."""
    rng = np.random.default_rng(0)
    t = 128
    q = normal(rng, 3, 3, HEADS, self.DIM)
    k, v = normal(rng, 3, t, 2, self.DIM), normal(rng, 3, t, 2, self.DIM)
    want, lse = self.check((q, k, v, jnp.array([0, 1, 100])), num_splits=2)
    assert np.isneginf(lse[0]).all() and (want[0] == 0).all()  # nothing cached
    assert np.isneginf(lse[1, :, :2]).all() and np.isfinite(lse[1, :, 2]).all()  # positions < 0
    assert np.abs(want[1, 2]).max() > 0.1 and np.abs(want[2]).max() > 0.1

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_scrambled_pool(self, dtype):
    """A 2-d page table over a pool in scrambled order with spare pages, MQA, a local window."""
    rng = np.random.default_rng(1)
    t, batch = 64, 3
    per_seq = t // PAGE
    order = rng.permutation(batch * per_seq).reshape(batch, per_seq)
    k_pool = normal(rng, batch * per_seq + 2, PAGE, 1, SMALL_DIM, dtype=dtype)
    v_pool = normal(rng, batch * per_seq + 2, PAGE, 1, SMALL_DIM, dtype=dtype)
    q = normal(rng, batch, 1, HEADS, SMALL_DIM, dtype=dtype)
    want, _ = self.check((q, k_pool, v_pool, jnp.array([5, 64, 30])), dtype,
                         page_table=jnp.asarray(order), mask=sja.LocalMask((t, t), (20, 0)),
                         num_splits=1)
    assert np.abs(want).max(axis=(1, 2, 3)).min() > 0.1

  def test_pages_of_one_kv_head_with_absent_pages(self):
    """A 3-d table (`KVCache`) whose A-shape pattern dropped pages (-1), four splits."""
    q, cache, mask = absent_pages_case()
    table = np.asarray(cache.page_table)
    assert (table[:, :, 0] >= 0).all() and (table[:, :, 1:3] == -1).all()  # sinks kept
    want, _ = self.check((q, cache.k, cache.v, jnp.array([100, 37])),
                         page_table=cache.page_table, mask=mask, num_splits=4)
    assert np.abs(want).max(axis=(1, 2, 3)).min() > 0.1

  def test_selected_pages(self):
    """Quest's pages (3 of 8 per KV head), S2 heads of two masks per tile, default splits."""
    q, cache, pages = selected_pages_case()
    present = (np.asarray(cache.page_table) >= 0).sum(-1)
    assert (present == 8).all() and ((np.asarray(pages) >= 0).sum(-1) == 3).all()
    want, _ = self.check((q, cache.k, cache.v, cache.lengths), page_table=cache.page_table,
                         pages=pages, mask=shards(cache.capacity))
    assert np.abs(want).max(axis=(1, 2, 3)).min() > 0.1

  def test_empty_batch(self):
    q, k = jnp.zeros((0, 1, HEADS, SMALL_DIM)), jnp.zeros((4, PAGE, SMALL_DIM))
    out, lse = sja.decode_attention(q, k, k, jnp.zeros((0,), jnp.int32), return_lse=True,
                                    page_table=jnp.zeros((0, 2, 4), jnp.int32),
                                    implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)
    assert out.shape == q.shape and lse.shape == (0, HEADS, 1)


class TestPallasTritonInterpret(TestPallasTriton):
  INTERPRET = True


class TestPallasTPU(TestPallasTriton):
  IMPLEMENTATION = "pallas_tpu"
  DIM = 128  # a page of several KV heads is a (page_size, head_dim) block: lanes of 128

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "tpu":
      pytest.skip("compiled Mosaic kernels need a TPU; the Interpret class runs them on CPU")


class TestPallasTPUInterpret(TestPallasTPU):
  INTERPRET = True


def _kernel_decode(kernel, sizes, q, k, v, table, lengths):
  """The backend's entry on decode's page view, with launch settings `sizes`."""
  pool, phys, logical, head = decode.paged_view(k, table, None)
  return kernel.decode(q, pool, decode.paged_view(v, table, None)[0], phys, logical, head,
                       lengths, mask=sja.LocalMask((256, 256), (100, 0)), sm_scale=0.1,
                       num_splits=2, block_sizes=sizes, interpret=False)


@pytest.mark.parametrize("platform, implementation, marker, sizes, setting", [
    ("cuda", "pallas_triton", "__gpu$xla.gpu.triton",
     decode_pallas_gpu.BlockSizes(num_warps=2, num_stages=3), "num_warps = 2"),
    ("tpu", "pallas_tpu", "tpu_custom_call",
     decode_pallas_tpu.BlockSizes(vmem_limit_bytes=3 << 24), "50331648")])
def test_kernels_lower_for_gpu_and_tpu(platform, implementation, marker, sizes, setting):
  """Compiled (not interpreted): a 2-d table in bfloat16 with launch settings, and a 3-d one
  with chosen pages, S2 heads and 2 new tokens through `decode_attention`."""
  t, dim = 256, 128
  q = jax.ShapeDtypeStruct((2, 2, 8, dim), jnp.bfloat16)
  pool = jax.ShapeDtypeStruct((20, 32, 2, dim), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((2, t // 32), jnp.int32)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  kernel = decode_pallas_gpu if platform == "cuda" else decode_pallas_tpu
  module = export_mlir(functools.partial(_kernel_decode, kernel, sizes), platform, q, pool, pool,
                       table, lengths)
  assert module.count(marker) == 1 and setting in module  # the launch settings are read

  heads_pool = jax.ShapeDtypeStruct((32, 32, dim), jnp.bfloat16)
  table_3d = jax.ShapeDtypeStruct((2, 2, t // 32), jnp.int32)
  chosen = jax.ShapeDtypeStruct((2, 2, 4), jnp.int32)
  mask = sja.StridedShardMask.for_heads((t, t), 8, block=32, num_shards=4, local_window=16)
  fn = lambda q, k, v, n, table, pages: sja.decode_attention(  # noqa: E731
      q, k, v, n, page_table=table, pages=pages, mask=mask, implementation=implementation,
      interpret=False)
  assert export_mlir(fn, platform, q, heads_pool, heads_pool, lengths, table_3d,
                     chosen).count(marker) == 1


def test_bad_input():
  rng = np.random.default_rng(4)
  q = normal(rng, 1, 1, HEADS, SMALL_DIM)
  n = jnp.array([20])
  run = lambda impl, q, k, **kw: sja.decode_attention(  # noqa: E731
      q, k, k, n, implementation=impl, interpret=True, **kw)
  narrow = normal(rng, 4, 8, 1, SMALL_DIM)  # pages of 8 positions
  with pytest.raises(ValueError, match=r"page_size=8 must be a power of 2 >= 16 for the Triton"):
    run("pallas_triton", q, narrow, page_table=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"head_dim=24 must be a power of 2 >= 16 for the Triton"):
    run("pallas_triton", normal(rng, 1, 1, HEADS, 24), normal(rng, 1, 32, 1, 24))
  odd = normal(rng, 4, 12, 1, SMALL_DIM)
  with pytest.raises(ValueError, match=r"page_size=12 must be a multiple of 8 for the TPU"):
    run("pallas_tpu", q, odd, page_table=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"head_dim=16 must be a multiple of 128 for the TPU .* "
                                       r"several KV heads"):
    run("pallas_tpu", q, normal(rng, 1, 32, 2, SMALL_DIM))
  table_mask = sja.NumpyMask(np.tril(np.ones((32, 32), bool)))
  for impl in ("pallas_triton", "pallas_tpu"):
    with pytest.raises(ValueError, match=r"mask \(NumpyMask\) reads a table.*implementation="
                                         r"\"xla\""):
      run(impl, q, normal(rng, 1, 32, 1, SMALL_DIM), mask=table_mask)


def test_page_lists_keep_the_pages_some_new_query_reads():
  """Pages past the newest token, absent ones and those out of every new query's window go
  last; the rest are shared evenly among the splits."""
  phys = jnp.array([[[3, 0, -1, 1, 2, 5, 4, 6]]], jnp.int32)  # [batch 1, kv_heads 1, 8]
  logical = jnp.arange(8, dtype=jnp.int32)[None, None]
  mask = sja.LocalMask((128, 128), (16, 0))
  lists = pages_lib.page_lists(phys, logical, jnp.array([80]), mask, heads=2, q_tokens=3,
                               page_size=PAGE, splits=2)
  # Queries at 77..79 read keys 61..79: pages 3 and 4 (page 2 is absent, 5.. are past them).
  np.testing.assert_array_equal(lists.phys[0, 0, :2], [1, 2])
  np.testing.assert_array_equal(lists.logical[0, 0, :2], [3, 4])
  np.testing.assert_array_equal(lists.start[0, 0], [0, 1])
  np.testing.assert_array_equal(lists.stop[0, 0], [1, 2])
  every = pages_lib.page_lists(phys, logical, jnp.array([80]), None, heads=2, q_tokens=3,
                               page_size=PAGE, splits=3)
  np.testing.assert_array_equal(every.logical[0, 0, :4], [0, 1, 3, 4])  # present, before 80
  np.testing.assert_array_equal(every.stop[0, 0] - every.start[0, 0], [1, 1, 2])
