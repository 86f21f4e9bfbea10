"""Every block-sparse attention implementation against the dense reference.

Values and gradients of q, k and v under jit. Pallas kernels run on CPU in
interpret mode (the *Interpret classes); on a GPU or TPU the parent classes
run them compiled. Lowering checks export the kernels for CUDA and TPU.
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


def masks(t, heads):
  return {
      "causal_local": sja.CausalMask((t, t)) & sja.LocalMask((t, t), (t // 3, 0)),
      "bigbird": sja.BigBirdMask((t, t), block=t // 4, num_random=1, seed=1),
      "shards": sja.StridedShardMask.for_heads((t, t), heads, block=t // 8, num_shards=2,
                                               local_window=t // 8),
      "random_blocks": sja.NumpyMask(np.kron(np.random.default_rng(0).random((4, 4)) < 0.4,
                                             np.ones((t // 4, t // 4), bool))
                                     | np.eye(t, dtype=bool)),
      "full": sja.FullMask((t, t)),
      "chunked": sja.ChunkedCausalMask((t, t), chunk=t // 3),
  }


# The masks whose layouts carry them, for the kernels to evaluate in partial blocks; the
# others (tables) keep the element-mask table.
COMPUTED = {"causal_local", "shards", "full", "chunked"}


def random_block_mask(rng, blocks, block, density):
  """bool[t, t]: random blocks with 90% of their entries; every query row sees a key."""
  t = blocks * block
  table = rng.random((blocks, blocks)) < density
  chosen = rng.integers(blocks, size=blocks)
  table[np.arange(blocks), chosen] = True  # each query block reads a key block ...
  array = np.kron(table, np.ones((block, block), bool)) & (rng.random((t, t)) < 0.9)
  array[np.arange(t), np.repeat(chosen, block) * block + rng.integers(block, size=t)] = True
  return array  # ... and each of its rows a key in it


@jax.jit
def _visible(layout):
  return sja.dense_mask(layout).any(-1)


@jax.jit
def _reference(q, k, v, cotangent, layout):
  """Gradients of q, k, v and the output of the reference, in float32.

  Jitted once for the module, the layout an argument: tests of one shape share
  one compile (eager, each op would compile).
  """
  def loss(q, k, v):
    out = sja.block_sparse_attention(q, k, v, layout, implementation="reference")
    return jnp.sum(out * cotangent), out

  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*f32)


def check(impl, q, k, v, cotangent, layout, interpret, empty_rows=False):
  """Forward and gradients of `impl` against the float32 reference, under jit.

  `layout` is a `Layout`, or a function (q, k) -> `Layout` to build inside the
  jit. Unless `empty_rows`, every query row must see a key (else 0 is
  compared with 0). Returns the output and the gradients of q, k and v.
  """
  make = layout if callable(layout) else lambda q, k: layout
  built = jax.jit(layout)(q, k) if callable(layout) else layout  # what `make` builds in the jit
  visible = np.asarray(_visible(built))
  assert empty_rows or visible.all(), "a query row sees no key: the test could pass vacuously"

  def loss(impl, q, k, v):
    out = sja.block_sparse_attention(q, k, v, make(q, k), implementation=impl,
                                     interpret=interpret)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
  (dq, dk, dv), out = grad(impl, q, k, v)
  (rq, rk, rv), ref = _reference(q, k, v, cotangent, built)
  assert out.shape == q.shape and out.dtype == q.dtype
  for got, want in [(dq, rq), (dk, rk), (dv, rv)]:
    assert got.shape == want.shape and got.dtype == q.dtype
  tol = TOLERANCE[q.dtype.type]
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
  scale = max(float(jnp.abs(rq).max()), float(jnp.abs(rk).max()), float(jnp.abs(rv).max()), 1.0)
  for got, want in [(dq, rq), (dk, rk), (dv, rv)]:
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * scale, rtol=tol)
  return out, (dq, dk, dv)


class TestXLA:
  IMPLEMENTATION = "xla"
  INTERPRET = None
  BLOCK = 16

  def setup_method(self):
    pass

  def layout(self, mask, heads):
    return sja.make_layout(mask, num_heads=heads, block_q=self.BLOCK, block_kv=self.BLOCK)

  @pytest.mark.parametrize("name", ["causal_local", "bigbird", "shards", "random_blocks", "full",
                                    "chunked"])
  def test_matches_reference(self, name):
    t, heads = 4 * self.BLOCK, 2
    q, k, v, ct = inputs(0, 2, t, heads, heads, 32, jnp.float32)
    layout = self.layout(masks(t, heads)[name], heads)
    assert (layout.masks is not None) == (name in COMPUTED)  # the kernels' path: mask or table
    check(self.IMPLEMENTATION, q, k, v, ct, layout, self.INTERPRET)

  def test_empty_rows(self):
    """A query row that sees no key gets 0 and a 0 gradient, never NaN."""
    t, heads, empty = 4 * self.BLOCK, 2, self.BLOCK + self.BLOCK // 2
    layout = self.layout(sja.CausalMask((t, t), offset=-empty), heads)  # a block and a half
    visible = np.asarray(sja.dense_mask(layout)).any(-1)
    assert not visible[:, :empty].any() and visible[:, empty:].all()
    q, k, v, ct = inputs(3, 2, t, heads, heads, 32, jnp.float32)
    out, grads = check(self.IMPLEMENTATION, q, k, v, ct, layout, self.INTERPRET,
                       empty_rows=True)
    np.testing.assert_array_equal(np.asarray(out[:, :empty]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][:, :empty]), 0.0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))

  @pytest.mark.parametrize("routed", [False, True])
  def test_empty_batch(self, routed):
    t, heads = 4 * self.BLOCK, 2
    q, k, v, ct = inputs(4, 0, t, heads, 1, 32, jnp.bfloat16)
    fixed = self.layout(masks(t, heads)["causal_local"], heads)
    route = lambda q, k: sja.topk_layout(q, k, block_q=self.BLOCK, block_kv=self.BLOCK,
                                         k_blocks=2)

    def loss(q, k, v):
      layout = route(q, k) if routed else fixed
      out = sja.block_sparse_attention(q, k, v, layout, implementation=self.IMPLEMENTATION,
                                       interpret=self.INTERPRET)
      return jnp.sum(out.astype(jnp.float32) * ct), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    for got, want in [(out, q), *zip(grads, (q, k, v))]:
      assert got.shape == want.shape and got.dtype == want.dtype

  # Each half precision once and each head grouping once (GQA 4:2, MQA 4:1).
  @pytest.mark.parametrize("kv_heads, dtype", [(2, jnp.bfloat16), (1, jnp.float16)],
                           ids=["gqa-bfloat16", "mqa-float16"])
  def test_gqa_mqa_and_half_precision(self, dtype, kv_heads):
    t, heads = 4 * self.BLOCK, 4
    q, k, v, ct = inputs(1, 1, t, heads, kv_heads, 64, dtype)
    check(self.IMPLEMENTATION, q, k, v, ct, self.layout(masks(t, heads)["causal_local"], heads),
          self.INTERPRET)

  def test_topk_layout(self):
    t, heads = 4 * self.BLOCK, 2
    q, k, v, ct = inputs(2, 2, t, heads, 1, 32, jnp.float32)
    route = lambda q, k: sja.topk_layout(q, k, block_q=self.BLOCK, block_kv=self.BLOCK,
                                         k_blocks=2, causal=True)
    check(self.IMPLEMENTATION, q, k, v, ct, route, self.INTERPRET)  # routed inside the jit


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
  INTERPRET = True

  @pytest.mark.parametrize("name", ["causal_local", "shards"])
  def test_matches_reference(self, name):  # the interpreter is slow at 128-blocks: fewer masks
    super().test_matches_reference(name)


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
@hypothesis.settings(max_examples=2, deadline=None)
@hypothesis.given(
    block=st.sampled_from([16, 32]), blocks=st.integers(2, 4),
    heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]), dim=st.sampled_from([16, 24, 64]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), density=st.floats(0.1, 1.0),
    seed=st.integers(0, 1000))
def test_random_layouts(implementation, block, blocks, heads, dim, dtype, density, seed):
  array = random_block_mask(np.random.default_rng(seed), blocks, block, density)
  layout = sja.make_layout(sja.NumpyMask(array), num_heads=heads[0], block_q=block, block_kv=block)
  q, k, v, ct = inputs(seed, 1, block * blocks, heads[0], heads[1], dim, dtype)
  check(implementation, q, k, v, ct, layout, True)


def test_xla_layout_as_jit_argument():
  """A traced layout pads the XLA path's pair lists to q_blocks * max_kv; values do not change."""
  t, heads = 64, 2
  layout = sja.make_layout(masks(t, heads)["causal_local"], num_heads=heads, block_q=16,
                           block_kv=16)
  assert int(layout.num_kv.sum()) < layout.kv_index.size  # so the padding is longer
  q, k, v, _ = inputs(5, 1, t, heads, heads, 16, jnp.float32)
  attend = jax.jit(lambda q, k, v, lay: sja.block_sparse_attention(q, k, v, lay,
                                                                   implementation="xla"))
  want = sja.block_sparse_attention(q, k, v, layout, implementation="reference")
  np.testing.assert_allclose(attend(q, k, v, layout), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_forward_mode(implementation):
  """jax.jvp works through the XLA path; the Pallas kernels are reverse mode only (documented)."""
  t, heads = 32, 2
  layout = sja.make_layout(masks(t, heads)["causal_local"], num_heads=heads, block_q=16,
                           block_kv=16)
  q, k, v, _ = inputs(6, 1, t, heads, heads, 16, jnp.float32)
  tangents = inputs(7, 1, t, heads, heads, 16, jnp.float32)[:3]
  attend = lambda impl: lambda q, k, v: sja.block_sparse_attention(
      q, k, v, layout, implementation=impl, interpret=True)
  if implementation != "xla":
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
      jax.jvp(attend(implementation), (q, k, v), tangents)
    return
  _, got = jax.jvp(attend("xla"), (q, k, v), tangents)
  _, want = jax.jvp(attend("reference"), (q, k, v), tangents)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_bad_input():
  t = 64
  layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=2, block_q=16, block_kv=16)
  q = jnp.zeros((1, t, 2, 16))
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    sja.block_sparse_attention(q, q, q, layout, implementation="cuda")
  with pytest.raises(ValueError, match="the layout is for q_len=64, kv_len=64, heads=2"):
    sja.block_sparse_attention(q[:, :32], q[:, :32], q[:, :32], layout)
  with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of kv heads \(3\)"):
    sja.block_sparse_attention(q, jnp.zeros((1, t, 3, 16)), jnp.zeros((1, t, 3, 16)), layout)
  with pytest.raises(ValueError, match="must share one of float32"):
    sja.block_sparse_attention(q, q.astype(jnp.bfloat16), q, layout)
  with pytest.raises(ValueError, match="layout.block_q=16 must be a multiple of 128 for the TPU"):
    sja.block_sparse_attention(q, q, q, layout, implementation="pallas_tpu")
  small = sja.make_layout(sja.CausalMask((t, t)), num_heads=2, block_q=8, block_kv=8)
  with pytest.raises(ValueError, match="layout.block_q=8 must be a power of 2 >= 16 for the GPU"):
    sja.block_sparse_attention(q, q, q, small, implementation="pallas_triton")
  with pytest.raises(ValueError, match="num_warps=3 must be a power of 2 >= 1 or None"):
    pallas_gpu.block_sparse_attention(q, q, q, layout, 0.1, pallas_gpu.BlockSizes(num_warps=3),
                                      True)
  wide = sja.make_layout(sja.CausalMask((128, 128)), num_heads=2, block_q=128, block_kv=128)
  q = jnp.zeros((1, 128, 2, 16))
  with pytest.raises(ValueError, match="vmem_limit_bytes=0 must be an integer >= 1 or None"):
    pallas_tpu.block_sparse_attention(q, q, q, wide, 0.1, pallas_tpu.BlockSizes(vmem_limit_bytes=0),
                                      True)


def _inner_jaxprs(eqn):
  for param in jax.tree.leaves(list(eqn.params.values()),
                               is_leaf=lambda x: hasattr(x, "eqns") or hasattr(x, "jaxpr")):
    inner = getattr(param, "jaxpr", param)
    if hasattr(inner, "eqns"):
      yield inner


def _pallas_calls(fn, *args):
  """The pallas_call equations of fn's jaxpr (inside jit, custom_vjp and control flow)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn)
      else:
        for inner in _inner_jaxprs(eqn):
          walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _branches_on_block_kind(eqn) -> bool:
  """Whether a kernel branches inside its loop over blocks (a cond in a loop or in a cond).

  The Triton kernels loop with fori_loop, the Mosaic ones over grid steps guarded by
  pl.when (a cond); neither had a cond nested there before the full/partial branch.
  """
  def nested(jaxpr, inside):
    for e in jaxpr.eqns:
      if e.primitive.name == "cond" and inside:
        return True
      looped = inside or e.primitive.name in ("cond", "while")
      if any(nested(inner, looped) for inner in _inner_jaxprs(e)):
        return True
    return False
  return nested(eqn.params["jaxpr"], False)


@pytest.mark.parametrize("platform, block, marker, sizes, setting", [
    ("cuda", 64, "__gpu$xla.gpu.triton", pallas_gpu.BlockSizes(num_warps=2, num_stages=3),
     "num_warps = 2"),
    ("tpu", 128, "tpu_custom_call", pallas_tpu.BlockSizes(vmem_limit_bytes=3 << 24), "50331648")])
def test_kernels_lower_for_gpu_and_tpu(platform, block, marker, sizes, setting):
  t, heads = 4 * block, 4
  layout = sja.make_layout(sja.CausalMask((t, t)) & sja.LocalMask((t, t), (block + 7, 0)),
                           num_heads=heads, block_q=block, block_kv=block)
  q = jax.ShapeDtypeStruct((2, t, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, 2, 128), jnp.bfloat16)
  kernel = pallas_gpu if platform == "cuda" else pallas_tpu
  fwd = lambda q, k, v, lay, sizes=kernel.BlockSizes.get_default(): kernel.block_sparse_attention(
      q, k, v, lay, 0.1, sizes, False)
  module = _export(functools.partial(fwd, sizes=sizes), platform, q, kv, kv, layout)
  assert module.count(marker) == 1 and setting in module  # the launch settings are read
  grad = jax.grad(lambda q, k, v, lay: fwd(q, k, v, lay).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))
  assert _export(grad, platform, q, kv, kv, layout).count(marker) == 3  # fwd, dq, dk/dv
  # The mask is evaluated in the kernels: no element-mask table among their inputs, and a
  # branch on the block's kind; a table mask (BigBird) still reads its table.
  table = jax.ShapeDtypeStruct(layout.partial.shape, jnp.int32)
  bigbird = sja.make_layout(sja.BigBirdMask((t, t), block=block // 2), num_heads=heads,
                            block_q=block, block_kv=block)
  # Heads of different masks, with integer division (no sign op: Mosaic lowers it on a TPU only).
  heads_masks = sja.MultiHeadMask((sja.ChunkedCausalMask((t, t), chunk=block + 32),
                                   *sja.StridedShardMask.for_heads((t, t), heads - 1,
                                                                   block=block // 2,
                                                                   num_shards=3)))
  rows = sja.make_layout(heads_masks, num_heads=heads, block_q=block, block_kv=block)
  assert len(rows.masks) == heads
  assert _export(grad, platform, q, kv, kv, rows).count(marker) == 3
  for lay, with_table in [(layout, False), (rows, False), (bigbird, True)]:
    calls = _pallas_calls(grad, q, kv, kv, lay)
    assert len(calls) == 3 and all(_branches_on_block_kind(c) for c in calls)
    tables = [any(v.aval.ndim == 3 and v.aval.shape[1:] == table.shape[1:]
                  and v.aval.dtype == jnp.int32 for v in c.invars) for c in calls]
    assert tables == [with_table] * 3, (lay.masks, tables)
