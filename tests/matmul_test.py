"""Every block-sparse matmul implementation against the dense reference.

Values and gradients of x and of the block values under jit. Pallas kernels
run on CPU in interpret mode (the *Interpret classes); on a GPU or TPU the
parent classes run them compiled. Lowering checks export the kernels for CUDA
and TPU. Also the format, layouts and the static patterns.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src.matmul import pallas_gpu
from sparsejax._src.matmul import pallas_tpu
from sparsejax._src.matmul import reference

from kernel_testing import export_mlir as _export  # pylint: disable=g-multiple-import

TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def random_layout(rng, grid, density):
  layout = rng.random(grid) < density
  layout[rng.integers(grid[0]), rng.integers(grid[1])] = True  # never empty
  return layout


@jax.jit
def _reference(x, w, cotangent):
  """Gradients of x and the block values and the output of the reference, in float32.

  Jitted once for the module, the matrix an argument: checks of one shape share
  one compile (eager, each op would compile).
  """
  def reference_loss(x, values):
    y = reference.block_sparse_matmul(x, w._replace(values=values))
    return jnp.sum(y * cotangent), y

  return jax.grad(reference_loss, argnums=(0, 1), has_aux=True)(
      x.astype(jnp.float32), w.values.astype(jnp.float32))


def check(impl, x, w, cotangent, interpret, block_m=None):
  """Forward and gradients of `impl` against the float32 reference, under jit."""

  def loss(impl, x, values):
    y = sj.matmul.block_sparse_matmul(x, w._replace(values=values), implementation=impl,
                                      interpret=interpret, block_m=block_m)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y

  grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
  (dx, dv), y = grad(impl, x, w.values)
  (rx, rv), ref = _reference(x, w, cotangent)
  assert y.shape == ref.shape and y.dtype == x.dtype
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dv.shape == w.values.shape and dv.dtype == w.values.dtype
  tol = TOLERANCE[x.dtype.type]
  scale = max(float(jnp.abs(ref).max()), 1.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol * scale, rtol=tol)
  for got, want in [(dx, rx), (dv, rv)]:
    scale = max(float(jnp.abs(want).max()), 1.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * scale, rtol=tol)
  # Padded slots get no gradient.
  np.testing.assert_array_equal(np.asarray(dv)[~np.asarray(w.valid())], 0)
  return y


def case(m, k, n, block, density, dtype, seed=0):
  """x, w, a cotangent and the layout; host random values (no compile per new shape)."""
  rng = np.random.default_rng(seed)
  layout = random_layout(rng, (k // block[0], n // block[1]), density)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
  w = sj.matmul.BlockSparseMatrix.from_dense(normal(k, n).astype(dtype), layout)
  x = normal(m, k).astype(dtype)
  return x, w, normal(m, n), layout


class TestXLA:
  IMPLEMENTATION = "xla"
  INTERPRET = None
  BLOCK = (16, 32)
  BLOCK_M = None

  def setup_method(self):
    pass

  @pytest.mark.parametrize("density", [0.25, 1.0])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_matches_reference(self, density, dtype):
    bk, bn = self.BLOCK
    x, w, ct, _ = case(24, 4 * bk, 3 * bn, self.BLOCK, density, dtype)
    check(self.IMPLEMENTATION, x, w, ct, self.INTERPRET, self.BLOCK_M)

  def test_leading_dims_and_empty_columns(self):
    bk, bn = self.BLOCK
    layout = np.zeros((3, 4), bool)
    layout[[0, 2], 1] = True
    layout[1, 3] = True  # columns 0 and 2 empty: their outputs are 0
    w = sj.matmul.BlockSparseMatrix.from_dense(jnp.ones((3 * bk, 4 * bn)), layout)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3 * bk))
    y = sj.matmul.block_sparse_matmul(x, w, implementation=self.IMPLEMENTATION,
                                      interpret=self.INTERPRET, block_m=self.BLOCK_M)
    assert y.shape == (2, 5, 4 * bn)
    np.testing.assert_array_equal(np.asarray(y[..., :bn]), 0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.to_dense()), atol=1e-4, rtol=1e-4)


class TestPallasTriton(TestXLA):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  BLOCK_M = 16

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Triton kernels need a GPU; the Interpret class runs them on CPU")


class TestPallasTritonInterpret(TestPallasTriton):
  INTERPRET = True


class TestPallasTPU(TestXLA):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = False
  BLOCK = (128, 128)
  BLOCK_M = 8

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != "tpu":
      pytest.skip("compiled Mosaic kernels need a TPU; the Interpret class runs them on CPU")


class TestPallasTPUInterpret(TestPallasTPU):
  INTERPRET = True


@hypothesis.settings(max_examples=4, deadline=None)
@hypothesis.given(
    implementation=st.sampled_from(["xla", "pallas_triton"]),
    bk=st.sampled_from([16, 32, 64, 128]), bn=st.sampled_from([16, 32, 64, 128]),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)), m=st.integers(1, 40),
    density=st.floats(0.05, 1.0), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 1000))
def test_random_shapes(implementation, bk, bn, grid, m, density, dtype, seed):
  x, w, ct, _ = case(m, grid[0] * bk, grid[1] * bn, (bk, bn), density, dtype, seed)
  check(implementation, x, w, ct, True, 16)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch(implementation, lead):
  w = sj.matmul.BlockSparseMatrix.from_dense(jnp.ones((256, 384), jnp.bfloat16),
                                             np.eye(2, 3, dtype=bool))
  x = jnp.ones(lead + (256,), jnp.bfloat16)

  def f(x, values):
    return sj.matmul.block_sparse_matmul(x, w._replace(values=values),
                                         implementation=implementation, interpret=True)

  y = jax.jit(f)(x, w.values)
  assert y.shape == lead + (384,) and y.dtype == jnp.bfloat16
  dx, dv = jax.jit(jax.grad(lambda x, v: f(x, v).astype(jnp.float32).sum(), argnums=(0, 1)))(
      x, w.values)
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dv.shape == w.values.shape and dv.dtype == w.values.dtype
  np.testing.assert_array_equal(np.asarray(dv, np.float32), 0)  # no rows, no gradient


def test_forward_mode_only_in_reference():
  w = sj.matmul.BlockSparseMatrix.from_dense(jnp.ones((32, 32)), np.eye(2, dtype=bool))
  x, t = jnp.ones((3, 32)), jnp.arange(96.0).reshape(3, 32)
  matmul = lambda impl: lambda x: sj.matmul.block_sparse_matmul(x, w, implementation=impl)
  _, tangent = jax.jvp(matmul("reference"), (x,), (t,))
  np.testing.assert_allclose(np.asarray(tangent), np.asarray(t @ w.to_dense()), rtol=1e-6)
  with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp"):
    jax.jvp(matmul("xla"), (x,), (t,))


def test_format_round_trip_and_transposed_lists():
  rng = np.random.default_rng(0)
  layout = random_layout(rng, (5, 6), 0.4)
  dense = rng.standard_normal((5 * 8, 6 * 4)).astype(np.float32)
  w = sj.matmul.BlockSparseMatrix.from_dense(jnp.asarray(dense), layout)
  assert w.shape == (40, 24) and w.block_shape == (8, 4) and w.grid == (5, 6)
  assert w.max_per_col == layout.sum(0).max() and w.max_per_row == layout.sum(1).max()
  np.testing.assert_array_equal(np.asarray(w.layout()), layout)
  np.testing.assert_array_equal(np.asarray(w.to_dense()),
                                dense * np.kron(layout, np.ones((8, 4), bool)))
  # Every transposed entry points at the slot holding the same block.
  for r in range(5):
    for t in range(int(w.t_count[r])):
      j, s = int(w.t_col[r, t]), int(w.t_slot[r, t])
      assert int(w.row_index[j, s]) == r and s < int(w.count[j])
  np.testing.assert_array_equal(np.asarray(w.count), layout.sum(0))
  np.testing.assert_array_equal(np.asarray(w.t_count), layout.sum(1))
  # The nonzero blocks of a masked matrix give the same format.
  again = sj.matmul.BlockSparseMatrix.from_dense(w.to_dense(), block_shape=(8, 4))
  np.testing.assert_array_equal(np.asarray(again.layout()), layout)


def test_block_layout_of_a_block_mask():
  layout = np.array([[True, False, True], [False, False, True]])
  mask = np.kron(layout, np.ones((4, 2), bool))
  np.testing.assert_array_equal(np.asarray(sj.matmul.block_layout(mask, (4, 2))), layout)
  stacked = np.stack([mask, ~mask])  # leading dims are tiled by 1
  np.testing.assert_array_equal(np.asarray(sj.matmul.block_layout(stacked, (4, 2))),
                                np.stack([layout, ~layout]))
  traced = jax.jit(lambda m: sj.matmul.block_layout(m, (4, 2)))(jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(traced), layout)
  with pytest.raises(ValueError, match=r"block_shape=\(4, 4\) does not divide the mask of shape "
                                       r"\(8, 6\)"):
    sj.matmul.block_layout(mask, (4, 4))
  with pytest.raises(ValueError, match=r"block_shape=\(2, 2, 2\) does not divide the mask"):
    sj.matmul.block_layout(np.ones((4, 4), bool), (2, 2, 2))
  with pytest.raises(ValueError, match=r"not block-structured for block_shape=\(2, 2\): some "
                                       "tiles are partly on"):
    sj.matmul.block_layout(np.eye(4, dtype=bool), (2, 2))
  with pytest.raises(ValueError, match="mask dtype float32 must be bool"):
    sj.matmul.block_layout(jnp.ones((4, 4)), (2, 2))
  with pytest.raises(ValueError, match=r"block_shape=\(0, 2\) must be a tuple of integers >= 1"):
    sj.matmul.block_layout(np.ones((4, 4), bool), (0, 2))


def test_traced_layouts_change_data_not_shapes():
  rng = np.random.default_rng(1)
  dense = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  traces = []

  @jax.jit
  def f(layout):
    traces.append(1)
    w = sj.matmul.BlockSparseMatrix.from_dense(dense, layout, max_per_col=2, max_per_row=3)
    return sj.matmul.block_sparse_matmul(x, w, implementation="xla"), w.layout()

  for seed in range(3):
    layout = np.zeros((4, 4), bool)
    layout[rng.permutation(4)[:2], seed] = True
    y, kept = f(jnp.asarray(layout))
    np.testing.assert_array_equal(np.asarray(kept), layout)
    expanded = np.kron(layout, np.ones((16, 16), bool))
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ (dense * expanded)), atol=1e-4)
  assert len(traces) == 1
  # A traced layout that overflows its slots keeps the blocks that fit, the
  # same ones forward and backward.
  full = jnp.ones((4, 4), bool)
  y, kept = f(full)
  assert int(kept.sum(0).max()) <= 2 and int(kept.sum(1).max()) <= 3
  expanded = np.kron(np.asarray(kept), np.ones((16, 16), bool))
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ (dense * expanded)), atol=1e-4)


def test_bad_input():
  from_dense, matmul = sj.matmul.BlockSparseMatrix.from_dense, sj.matmul.block_sparse_matmul
  w = from_dense(jnp.ones((64, 32)), np.ones((4, 2), bool))
  with pytest.raises(ValueError, match=r"x.shape\[-1\] must be 64"):
    matmul(jnp.ones((3, 48)), w)
  with pytest.raises(ValueError, match="x and w must share one of float32.*bfloat16 and w float32"):
    matmul(jnp.ones((3, 64), jnp.bfloat16), w)
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    matmul(jnp.ones((3, 64)), w, implementation="cuda")
  with pytest.raises(ValueError, match="block_m=0 must be an integer >= 1"):
    matmul(jnp.ones((3, 64)), w, implementation="pallas", block_m=0)
  with pytest.raises(ValueError, match=r"w.row_index has entries outside \[0, 4\)"):
    matmul(jnp.ones((3, 64)), w._replace(row_index=w.row_index + 3))
  with pytest.raises(ValueError, match=r"w.t_slot must be an integer array of shape \(4, 2\)"):
    matmul(jnp.ones((3, 64)), w._replace(t_slot=w.t_slot[:2]))
  with pytest.raises(ValueError, match="w must be a sj.matmul.BlockSparseMatrix"):
    matmul(jnp.ones((3, 64)), jnp.ones((64, 32)))
  with pytest.raises(ValueError, match=r"block_shape=\(16, 24\) does not divide w of shape "
                                       r"\(64, 32\)"):
    from_dense(jnp.ones((64, 32)), block_shape=(16, 24))
  with pytest.raises(ValueError, match=r"layout of shape \(3, 2\) does not tile w of shape"):
    from_dense(jnp.ones((64, 32)), np.ones((3, 2), bool))
  with pytest.raises(ValueError, match="layout must be a 2-d bool array"):
    from_dense(jnp.ones((64, 32)), np.ones((4, 2)))
  with pytest.raises(ValueError, match="max_per_col=1 but a block column of the layout has 4"):
    from_dense(jnp.ones((64, 32)), np.ones((4, 2), bool), max_per_col=1)
  with pytest.raises(ValueError, match="a traced layout needs max_per_col and max_per_row"):
    jax.jit(lambda m: from_dense(jnp.ones((64, 32)), m))(jnp.ones((4, 2), bool))
  with pytest.raises(ValueError, match="the TPU kernel needs a block shape of multiples of 128"):
    matmul(jnp.ones((8, 64)), w, implementation="pallas_tpu")
  odd = from_dense(jnp.ones((48, 32)), np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="the GPU kernel needs bk a power of 2 >= 16, got 24"):
    matmul(jnp.ones((8, 48)), odd, implementation="pallas_triton")


@pytest.mark.parametrize("platform, marker", [("cuda", "__gpu$xla.gpu.triton"),
                                              ("tpu", "tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(platform, marker):
  layout = sj.matmul.block_diagonal_layout((4, 4), 2)
  w = sj.matmul.BlockSparseMatrix.from_dense(jnp.ones((512, 512), jnp.bfloat16), layout)
  x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
  kernel = pallas_gpu if platform == "cuda" else pallas_tpu
  fwd = lambda x, w: kernel.block_sparse_matmul(x, w, kernel.BlockSizes.get_default(), False)
  assert _export(fwd, platform, x, w).count(marker) == 1
  grad = jax.grad(lambda x, v: fwd(x, w._replace(values=v)).astype(jnp.float32).sum(),
                  argnums=(0, 1))
  assert _export(grad, platform, x, w.values).count(marker) == 2  # dx, dw


def test_patterns():
  diag = sj.matmul.block_diagonal_layout((8, 4), 4)
  assert diag.shape == (8, 4) and diag.sum() == 8 and diag[0, 0] and diag[7, 3]
  assert not diag[0, 1]
  first, second = sj.matmul.monarch_layouts((16, 8), 4)
  assert first.shape == (16, 16) and second.shape == (16, 8)
  assert first.mean() == second.mean() == 0.25
  # The two factors together reach every output from every input.
  assert (first.astype(int) @ second.astype(int) > 0).all()
  fly = sj.matmul.butterfly_layout((16, 16), max_stride=4)
  assert (fly.sum(1) == 4).all() and (fly == fly.T).all() and fly[5, 5] and fly[5, 1]
  assert not fly[5, 13]  # stride 8 is beyond max_stride
  wide = sj.matmul.butterfly_layout((4, 8))
  np.testing.assert_array_equal(wide[:, :4], wide[:, 4:])
  with pytest.raises(ValueError, match="num_blocks=3 must divide both dims"):
    sj.matmul.block_diagonal_layout((8, 4), 3)
  with pytest.raises(ValueError, match="monarch_layouts needs row_blocks a multiple of"):
    sj.matmul.monarch_layouts((8, 8), 4)
  with pytest.raises(ValueError, match="max_stride=16 must be a power of 2 below 16"):
    sj.matmul.butterfly_layout((16, 16), max_stride=16)
  with pytest.raises(ValueError, match="butterfly_layout needs the smaller of shape=.* a power"):
    sj.matmul.butterfly_layout((6, 12))
