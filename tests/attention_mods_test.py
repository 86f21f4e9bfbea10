"""Packed documents, score modifiers and sinks in every attention implementation.

Each implementation against the float32 reference, values and gradients of
q, k, v, the arrays a score_mod captures and the sink logits, under jit; the
reference against `jax.nn.dot_product_attention` with the equivalent mask
and bias, and against a sink written out by hand. Pallas kernels run in
interpret mode on CPU (the *Interpret classes) and are exported for CUDA and
TPU.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja
from sparsejax._src.attention import pallas_gpu
from sparsejax._src.attention import pallas_tpu

from kernel_testing import attention_inputs as inputs, export_mlir as _export  # pylint: disable=g-multiple-import

TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def documents(seed, batch, t, mean_length):
  """int32[batch, t]: packed documents of random lengths (sorted ids, at least 2 per row)."""
  rng = np.random.default_rng(seed)
  starts = rng.random((batch, t)) < 1.0 / mean_length
  starts[:, 0] = False
  starts[:, t // 2] = True  # every row holds two documents or more
  return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


# A score_mod factory per case: params -> score_mod, so the test differentiates params.
SCORE_MODS = {
    "softcap": (lambda params: lambda s, b, h, q, kv: 2.0 * jnp.tanh(s / 2.0), ()),
    "alibi": (lambda params: lambda s, b, h, q, kv: s - params[0][h] * jnp.abs(q - kv),
              (np.array([0.25, 0.0625], np.float32),)),
    "relative_bias": (lambda params: lambda s, b, h, q, kv: s + params[0][h, q - kv + 511],
                      (np.linspace(-1, 1, 2 * 1024, dtype=np.float32).reshape(2, 1024),)),
}


def run(impl, interpret, q, k, v, cotangent, layout, *, ids=None, mod=None, params=(),
        sinks=None):
  """Output and gradients (q, k, v, params, sinks) of `impl` under jit."""
  def loss(q, k, v, params, sinks):
    out = sja.block_sparse_attention(
        q, k, v, layout, q_segment_ids=ids, score_mod=None if mod is None else mod(params),
        sinks=sinks, implementation=impl, interpret=interpret)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  params = tuple(jnp.asarray(p) for p in params)
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      q, k, v, params, sinks)
  return out, grads


def check(impl, interpret, q, k, v, cotangent, layout, **kwargs):
  """`impl` against the float32 reference; every query row must see a key or a sink."""
  out, grads = run(impl, interpret, q, k, v, cotangent, layout, **kwargs)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref, ref_grads = run("reference", None, *f32, cotangent, layout, **kwargs)
  assert float(jnp.abs(ref).max()) > 0.1  # not zero against zero
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = TOLERANCE[q.dtype.type]
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
  flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref_flat)
  for got, want in zip(flat, ref_flat):
    assert got.shape == want.shape
    scale = max(float(jnp.abs(want).max()), 1.0)
    assert float(jnp.abs(want).max()) > 0  # a gradient that is zero everywhere checks nothing
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * scale, rtol=tol)
  return out, grads


class TestXLA:
  IMPLEMENTATION = "xla"
  INTERPRET = None
  BLOCK = 16

  def setup_method(self):
    pass

  def layout(self, mask, heads=2):
    return sja.make_layout(mask, num_heads=heads, block_q=self.BLOCK, block_kv=self.BLOCK)

  def test_packed_documents(self):
    """Causal & document: documents shorter and longer than a block, sorted ids."""
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(0, 2, t, 2, 2, 32, jnp.float32)
    ids = documents(0, 2, t, self.BLOCK // 2)
    layout = self.layout(sja.CausalMask((t, t)))
    check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, ids=ids)
    # The derived layout drops blocks where no documents meet, and keeps the rest.
    derived = sja.segment_layout(layout, ids)
    assert int(derived.num_kv.sum()) < 2 * int(layout.num_kv.sum())

  def test_packed_documents_with_head_masks(self):
    """Heads with different masks (evaluated in the kernels, selected per row) and documents."""
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(4, 2, t, 2, 1, 32, jnp.float32)
    mask = sja.StridedShardMask.for_heads((t, t), 2, block=self.BLOCK // 2, num_shards=2,
                                          local_window=self.BLOCK // 2)
    layout = self.layout(mask)
    assert layout.masks == mask.masks  # two rows, two masks: the kernels select by row
    check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout,
          ids=documents(2, 2, t, 2 * self.BLOCK), sinks=jnp.array([0.5, -1.0]))

  @pytest.mark.parametrize("name", list(SCORE_MODS))
  def test_score_mod(self, name):
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(1, 1, t, 2, 2, 32, jnp.float32)
    mod, params = SCORE_MODS[name]
    layout = self.layout(sja.CausalMask((t, t)) & sja.LocalMask((t, t), (2 * self.BLOCK, 0)))
    check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, mod=mod, params=params)

  def test_sinks(self):
    """Sink logits in the denominator; rows with no visible key get 0 and still a sink gradient."""
    t, empty = 4 * self.BLOCK, self.BLOCK // 2
    q, k, v, ct = inputs(2, 1, t, 2, 1, 32, jnp.float32)
    layout = self.layout(sja.CausalMask((t, t), offset=-empty))
    sinks = jnp.array([0.5, -1.0])
    out, _ = check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, sinks=sinks)
    np.testing.assert_array_equal(np.asarray(out[:, :empty]), 0.0)

  def test_everything_together(self):
    """Documents, a captured bias table, sinks, GQA and bfloat16 at once."""
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(3, 2, t, 4, 2, 64, jnp.bfloat16)
    mod, params = SCORE_MODS["relative_bias"]
    mod4 = lambda p: (lambda s, b, h, i, j: mod(p)(s, b, h % 2, i, j))  # noqa: E731
    check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct,
          self.layout(sja.CausalMask((t, t)), heads=4), ids=documents(1, 2, t, self.BLOCK),
          mod=mod4, params=params, sinks=jnp.linspace(-1.0, 1.0, 4))

  def test_empty_batch(self):
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(5, 0, t, 2, 1, 32, jnp.bfloat16)
    mod, params = SCORE_MODS["alibi"]
    out, grads = run(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct,
                     self.layout(sja.CausalMask((t, t))), ids=jnp.zeros((0, t), jnp.int32),
                     mod=mod, params=params, sinks=jnp.array([0.1, 0.2]))
    assert out.shape == q.shape
    for got, want in zip(grads[:3], (q, k, v)):
      assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(grads[3][0]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[4]), 0.0)

  def test_backward_is_deterministic(self):
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(4, 1, t, 2, 1, 32, jnp.float32)
    mod, params = SCORE_MODS["alibi"]
    kwargs = dict(ids=documents(2, 1, t, self.BLOCK), mod=mod, params=params,
                  sinks=jnp.array([0.1, 0.2]))
    layout = self.layout(sja.CausalMask((t, t)))
    first = run(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, **kwargs)
    second = run(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, **kwargs)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestPallasTriton(TestXLA):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Triton kernels need a GPU; the Interpret class runs them on CPU")


class TestPallasTritonInterpret(TestPallasTriton):
  INTERPRET = True


class TestPallasTPU(TestXLA):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = False
  BLOCK = 128

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "tpu":
      pytest.skip("compiled Mosaic kernels need a TPU; the Interpret class runs them on CPU")


class TestPallasTPUInterpret(TestPallasTPU):
  """The interpreter is slow at 128-blocks: soft-cap with ALiBi, the combined test, determinism."""
  INTERPRET = True

  test_packed_documents = test_score_mod = test_sinks = None

  def test_softcap_and_alibi(self):
    """A derivative that is not 1 (soft-cap) and a captured array read at the head (SMEM)."""
    t = 4 * self.BLOCK
    q, k, v, ct = inputs(1, 1, t, 2, 2, 32, jnp.float32)
    softcap, _ = SCORE_MODS["softcap"]
    alibi, params = SCORE_MODS["alibi"]
    mod = lambda p: (lambda s, b, h, i, j: alibi(p)(softcap(p)(s, b, h, i, j), b, h, i, j))  # noqa: E731
    layout = self.layout(sja.CausalMask((t, t)) & sja.LocalMask((t, t), (2 * self.BLOCK, 0)))
    check(self.IMPLEMENTATION, self.INTERPRET, q, k, v, ct, layout, mod=mod, params=params)


def test_reference_matches_jax_dot_product_attention():
  """Causal & documents with a relative-position bias, as a boolean mask and a bias in JAX."""
  t, heads = 64, 2
  q, k, v, _ = inputs(5, 2, t, heads, heads, 16, jnp.float32)
  ids = documents(3, 2, t, 12)
  mod, (table,) = SCORE_MODS["relative_bias"]
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=heads, block_q=16, block_kv=16)
  got = sja.block_sparse_attention(q, k, v, layout, q_segment_ids=ids, score_mod=mod((jnp.asarray(table),)),
                                   implementation="reference")
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  bias = jnp.asarray(table[:, i - j + 511])[None]  # [1, heads, t, t]
  mask = jnp.asarray(j <= i)[None, None] & (ids[:, None, :, None] == ids[:, None, None, :])
  want = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_reference_sinks_by_hand():
  """A sink is a key with logit `sink` and value 0: append it and use plain softmax."""
  t, heads = 32, 2
  q, k, v, _ = inputs(6, 1, t, heads, heads, 16, jnp.float32)
  sinks = jnp.array([1.5, -0.5])
  layout = sja.make_layout(sja.FullMask((t, t)), num_heads=heads, block_q=16, block_kv=16)
  got = sja.block_sparse_attention(q, k, v, layout, sinks=sinks, implementation="reference")
  s = jnp.einsum("bthd,bshd->bhts", q, k) / 4.0
  s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))], -1)
  want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1)[..., :t], v)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
@hypothesis.settings(max_examples=2, deadline=None)
@hypothesis.given(
    block=st.sampled_from([16, 32]), heads=st.sampled_from([(2, 2), (2, 1)]),
    mean_length=st.integers(4, 80), mod=st.sampled_from([None, *SCORE_MODS]),
    sink=st.booleans(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    seed=st.integers(0, 1000))
def test_random_documents_and_mods(implementation, block, heads, mean_length, mod, sink, dtype,
                                   seed):
  t = 4 * block
  q, k, v, ct = inputs(seed, 2, t, heads[0], heads[1], 32, dtype)
  mask = sja.CausalMask((t, t)) & sja.LocalMask((t, t), (t // 2, 0))
  layout = sja.make_layout(mask, num_heads=heads[0], block_q=block, block_kv=block)
  factory, params = SCORE_MODS[mod] if mod else (None, ())
  check(implementation, True, q, k, v, ct, layout, ids=documents(seed, 2, t, mean_length),
        mod=factory, params=params, sinks=jnp.array([0.3, -0.3]) if sink else None)


def test_bad_input():
  t = 64
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=2, block_q=16, block_kv=16)
  q = jnp.zeros((1, t, 2, 16))
  attend = functools.partial(sja.block_sparse_attention, q, q, q, layout)
  with pytest.raises(ValueError, match=r"sinks must be a float array of shape \(heads,\) = \(2,\)"):
    attend(sinks=jnp.zeros(3))
  with pytest.raises(ValueError, match="score_mod must be a function"):
    attend(score_mod=2.0)
  with pytest.raises(ValueError, match="score_mod must return one float array shaped like"):
    attend(score_mod=lambda s, b, h, i, j: s.sum())
  with pytest.raises(ValueError, match="score_mod.* failed when called"):
    attend(score_mod=lambda s: s)
  with pytest.raises(ValueError, match=r"q_segment_ids must have shape \[batch, seq\] = \(1, 64\)"):
    attend(q_segment_ids=jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match="q_segment_ids must be an integer array"):
    attend(q_segment_ids=jnp.zeros((1, t)))
  with pytest.raises(ValueError, match="kv_segment_ids needs q_segment_ids"):
    attend(kv_segment_ids=jnp.zeros((1, t), jnp.int32))
  cross = sja.make_layout(sja.FullMask((t, 2 * t)), num_heads=2, block_q=16, block_kv=16)
  kv = jnp.zeros((1, 2 * t, 2, 16))
  with pytest.raises(ValueError, match=r"kv_segment_ids is required when q_len \(64\) != kv_len"):
    sja.block_sparse_attention(q, kv, kv, cross, q_segment_ids=jnp.zeros((1, t), jnp.int32))


@pytest.mark.parametrize("platform, block, marker", [
    ("cuda", 64, "__gpu$xla.gpu.triton"), ("tpu", 128, "tpu_custom_call")])
@pytest.mark.parametrize("mod", list(SCORE_MODS))
def test_kernels_with_mods_lower_for_gpu_and_tpu(platform, block, marker, mod):
  """Documents, each score_mod and sinks, forward and backward, lower for real hardware."""
  t, heads = 4 * block, 2
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=heads, block_q=block, block_kv=block)
  q = jax.ShapeDtypeStruct((2, t, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, 1, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, t), jnp.int32)
  kernel = pallas_gpu if platform == "cuda" else pallas_tpu
  factory, params = SCORE_MODS[mod]
  params = tuple(jnp.asarray(p) for p in params)

  def loss(q, k, v, ids, params, sinks):
    mods = sja_mods(factory(params), sinks, ids)
    out = kernel.block_sparse_attention(q, k, v, sja.segment_layout(layout, ids), 0.1,
                                        kernel.BlockSizes.get_default(), False, mods)
    return out.astype(jnp.float32).sum()

  sinks = jnp.zeros(heads)
  if platform == "tpu" and mod == "relative_bias":  # a gather by position: no Mosaic lowering
    with pytest.raises(ValueError, match="Mosaic cannot lower"):
      _export(jax.grad(loss, argnums=(0, 1, 2, 4, 5)), platform, q, kv, kv, ids, params, sinks)
    return
  module = _export(jax.grad(loss, argnums=(0, 1, 2, 4, 5)), platform, q, kv, kv, ids, params,
                   sinks)
  assert module.count(marker) >= 3  # fwd, dq, dk/dv


def sja_mods(score_mod, sinks, ids):
  from sparsejax._src.attention import mods as mods_lib  # pylint: disable=g-import-not-at-top
  return mods_lib.Mods(score_mod, sinks, ids, ids)
