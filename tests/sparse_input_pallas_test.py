"""The Pallas sparse-input matmul kernels (Triton and Mosaic) against the reference, and their
lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src.matmul import sparse_input
from sparsejax._src.matmul import sparse_input_pallas_gpu
from sparsejax._src.matmul import sparse_input_pallas_tpu

from kernel_testing import export_mlir  # pylint: disable=g-bad-import-order

K, N = 250, 256  # K not a multiple of any block_k: the list's last chunk is partial
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def sparse_rows(seed, rows, k, sparsity, dtype=jnp.float32):
  """x [rows, k]: `sparsity` of the channels zero in every row, a third of the rest zero in
  some rows (the rows differ, their union is the list)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  x[:, rng.permutation(k)[:round(sparsity * k)]] = 0
  if 0 < sparsity < 1:
    x[rng.random((rows, k)) < 1 / 3] = 0
  return jnp.asarray(x).astype(dtype)


def weights(seed, k, n, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n), np.float32)).astype(dtype)


class TestPallasTriton:
  IMPLEMENTATION = "pallas_triton"
  KERNEL = sparse_input_pallas_gpu
  INTERPRET = False
  BACKEND = "gpu"

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != self.BACKEND:
      pytest.skip(f"compiled kernels need a {self.BACKEND}; the Interpret class runs them on CPU")

  def check(self, x, w):
    """The public entry equals the float32 reference under jit, with the rows of `w` at channels
    zero in every row of `x` poisoned with NaN (so reading one shows); returns (result, count)."""
    run = jax.jit(functools.partial(sj.matmul.sparse_input_matmul,
                                    implementation=self.IMPLEMENTATION, interpret=self.INTERPRET))
    x2 = x.reshape(-1, x.shape[-1])
    unlisted = np.asarray(jnp.all(x2 == 0, axis=0))
    got = run(x, jnp.where(jnp.asarray(unlisted)[:, None], jnp.nan, w).astype(w.dtype))
    assert got.shape == (*x.shape[:-1], w.shape[1]) and got.dtype == x.dtype
    want = sparse_input.reference(x2, w).reshape(got.shape)
    tol = TOLERANCE[x.dtype.type]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
    return got, int(sparse_input.nonzero_index(x2).count)

  @pytest.mark.parametrize("rows, sparsity, dtype", [
      (1, 0.9, jnp.float32), (3, 0.5, jnp.float32), (8, 0.9, jnp.bfloat16),
      (1, 0.5, jnp.bfloat16), (3, 0.0, jnp.bfloat16), (8, 0.0, jnp.float32)])
  def test_against_reference(self, rows, sparsity, dtype):
    x = sparse_rows(rows, rows, K, sparsity, dtype)
    got, count = self.check(x, weights(0, K, N, dtype))
    if sparsity:
      assert 1 <= count <= K - 1 and count <= round((1 - sparsity) * K)
    else:
      assert count == K
    assert np.abs(np.asarray(got, np.float32)).max() > 1

  def test_all_zero_input(self):
    """An empty list: no row of w (all NaN) is used and the product is exactly zero."""
    got, count = self.check(jnp.zeros((2, 3, K)), weights(1, K, N))  # batch dims: 6 rows
    assert count == 0 and got.shape == (2, 3, N) and not np.asarray(got).any()

  def test_column_tiles(self):
    """Several output tiles (an N that is not a power of 2) and non-default block sizes."""
    n = 384
    x = sparse_rows(5, 4, K, 0.8)
    w = weights(2, K, n)
    sizes = self.KERNEL.BlockSizes(block_n=128, block_k=16)
    index = sparse_input.nonzero_index(x)
    got = jax.jit(functools.partial(self.KERNEL.sparse_input_matmul, block_sizes=sizes,
                                    interpret=self.INTERPRET))(x, w, index)
    assert got.shape == (4, n) and got.dtype == jnp.float32
    assert 16 < int(index.count) < K - 1  # several chunks, the last partial
    np.testing.assert_allclose(got, sparse_input.reference(x, w), atol=1e-4, rtol=1e-4)


class TestPallasTritonInterpret(TestPallasTriton):
  INTERPRET = True


class TestPallasTPU(TestPallasTriton):
  IMPLEMENTATION = "pallas_tpu"
  KERNEL = sparse_input_pallas_tpu
  BACKEND = "tpu"


class TestPallasTPUInterpret(TestPallasTPU):
  INTERPRET = True


@pytest.mark.parametrize("platform, implementation, marker, kernel, sizes, setting", [
    ("cuda", "pallas_triton", "__gpu$xla.gpu.triton", sparse_input_pallas_gpu,
     sparse_input_pallas_gpu.BlockSizes(num_warps=2, num_stages=3), "num_warps = 2"),
    ("tpu", "pallas_tpu", "tpu_custom_call", sparse_input_pallas_tpu,
     sparse_input_pallas_tpu.BlockSizes(vmem_limit_bytes=3 << 24), "50331648")])
def test_kernels_lower_for_gpu_and_tpu(platform, implementation, marker, kernel, sizes, setting):
  """Compiled (not interpreted), in bfloat16: the entry with launch settings, and the public
  function with batch dimensions."""
  x = jax.ShapeDtypeStruct((4, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  entry = lambda x, w: kernel.sparse_input_matmul(  # noqa: E731
      x, w, sparse_input.nonzero_index(x), block_sizes=sizes, interpret=False)
  module = export_mlir(entry, platform, x, w)
  assert module.count(marker) == 1 and setting in module  # the launch settings are read

  public = functools.partial(sj.matmul.sparse_input_matmul, implementation=implementation,
                             interpret=False)
  assert export_mlir(public, platform, jax.ShapeDtypeStruct((2, 3, 1024), jnp.bfloat16),
                     w).count(marker) == 1


def test_bad_input_and_default():
  x = sparse_rows(6, 1, 64, 0.5)
  with pytest.raises(ValueError, match=r"w.shape\[1\]=40 \(N\) must be a multiple of 16 for the "
                                       r"Triton .*implementation=\"xla\""):
    sj.matmul.sparse_input_matmul(x, weights(3, 64, 40), implementation="pallas_triton")
  with pytest.raises(ValueError, match=r"w.shape\[1\]=200 \(N\) must be a multiple of 128 .* for "
                                       r"the TPU .*implementation=\"xla\""):
    sj.matmul.sparse_input_matmul(x, weights(3, 64, 200), implementation="pallas_tpu")
  with pytest.raises(ValueError, match=r"block_k=24 must be a power of 2 >= 16"):
    sparse_input_pallas_gpu.sparse_input_matmul(
        x, weights(3, 64, 32), sparse_input.nonzero_index(x),
        block_sizes=sparse_input_pallas_gpu.BlockSizes(block_k=24), interpret=True)
  with pytest.raises(ValueError, match=r"block_n=200 must be a positive multiple of 128"):
    sparse_input_pallas_tpu.sparse_input_matmul(
        x, weights(3, 64, 128), sparse_input.nonzero_index(x),
        block_sizes=sparse_input_pallas_tpu.BlockSizes(block_n=200), interpret=True)


@pytest.mark.parametrize("backend, n, expected", [
    ("gpu", 256, "pallas_triton"), ("gpu", 40, "xla"), ("tpu", 384, "pallas_tpu"),
    ("tpu", 200, "xla"), ("cpu", 256, "xla"), ("gpu", 16, "dense"), ("cpu", 16, "dense")])
def test_default_implementation_where_the_kernel_tiles(monkeypatch, backend, n, expected):
  # w [4096, n] float32: 16 columns are 256 KiB, under the size where listing rows pays.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  w = jax.ShapeDtypeStruct((4096, n), jnp.float32)
  assert sparse_input.default_implementation(w) == expected
