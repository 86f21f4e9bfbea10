"""sparse_input_matmul: the xla path against the dense reference, the index it walks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src.matmul import sparse_input

K, N = 96, 40
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _sparse(shape, sparsity, seed=0, dtype=jnp.float32, shared=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  drop = rng.random((1,) * (len(shape) - 1) + shape[-1:] if shared else shape) < sparsity
  return jnp.asarray(np.where(drop, 0.0, x), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,sparsity,shared", [
    ((1, K), 0.9, False), ((1, K), 0.5, False), ((3, K), 0.5, True), ((8, K), 0.9, False),
    ((2, 4, K), 0.95, False), ((1, K), 0.0, False), ((1, K), 1.0, False), ((20, K), 0.9, False),
])
def test_xla_equals_the_dense_product(shape, sparsity, shared, dtype):
  x = _sparse(shape, sparsity, dtype=dtype, shared=shared)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((K, N)), dtype)
  count = int(sparse_input.nonzero_index(x.reshape(-1, K)).count)
  if 0 < sparsity < 1:
    assert 0 < count < K  # a real mix of zero and nonzero channels
  got = jax.jit(lambda x, w: sj.matmul.sparse_input_matmul(x, w, implementation="xla"))(x, w)
  want = sparse_input.reference(x.reshape(-1, K), w).reshape(*shape[:-1], N)
  assert got.shape == want.shape and got.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * 4)
  ref = sj.matmul.sparse_input_matmul(x, w, implementation="reference")
  np.testing.assert_allclose(np.asarray(ref, np.float32), want, rtol=tol, atol=tol)


def test_the_loop_walks_exactly_the_listed_rows():
  # Rows of w at zero inputs are poisoned: a walk that read them would show it.
  x = _sparse((4, K), 0.9, shared=True)
  index = sparse_input.nonzero_index(x)
  nonzero = np.flatnonzero(np.asarray(x != 0).any(0))
  count = int(index.count)
  assert count == len(nonzero) and 0 < count <= sparse_input._DENSE_ABOVE * K
  np.testing.assert_array_equal(index.indices[:count], nonzero)
  np.testing.assert_array_equal(index.indices[count:], nonzero[-1])  # padding repeats the last
  w = jnp.asarray(np.random.default_rng(1).standard_normal((K, N)), jnp.float32)
  poisoned = w.at[np.setdiff1d(np.arange(K), nonzero)].set(jnp.nan)
  got = jax.jit(sparse_input._xla)(x, poisoned)
  np.testing.assert_allclose(got, sparse_input.reference(x, w), rtol=1e-5, atol=1e-5)
  empty = sparse_input.nonzero_index(jnp.zeros((2, K)))
  assert int(empty.count) == 0 and not np.asarray(empty.indices).any()


@pytest.mark.parametrize("k", [1, 64, 96, 4099])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_the_index_lists_every_nonzero_channel_in_order(k, density):
  # The running count is built from blocks of 64: widths around and far past one block.
  x = jnp.asarray(np.random.default_rng(k).random((2, k)) < density, jnp.float32)
  nonzero = np.flatnonzero(np.asarray(x != 0).any(0))
  index = jax.jit(sparse_input.nonzero_index)(x)
  assert int(index.count) == len(nonzero)
  np.testing.assert_array_equal(index.indices[:len(nonzero)], nonzero)
  np.testing.assert_array_equal(index.indices[len(nonzero):], nonzero[-1] if len(nonzero) else 0)


def test_gradients_are_the_dense_products():
  x = _sparse((2, K), 0.8)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((K, N)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((2, N)), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(g * f(x, w))

  got = jax.jit(jax.grad(loss(lambda x, w: sj.matmul.sparse_input_matmul(
      x, w, implementation="xla")), (0, 1)))(x, w)
  want = jax.grad(loss(lambda x, w: x @ w), (0, 1))(x, w)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got[0])[np.asarray(x) == 0]).max() > 0  # zero inputs get gradient too


def test_bad_input():
  w = jnp.ones((K, N))
  with pytest.raises(ValueError, match=r"x of shape \(2, 95\) cannot multiply w of shape "
                     r"\(96, 40\): x.shape\[-1\] must be 96"):
    sj.matmul.sparse_input_matmul(jnp.ones((2, K - 1)), w)
  with pytest.raises(ValueError, match=r"w must be a matrix \[K, N\], got shape \(96,\)"):
    sj.matmul.sparse_input_matmul(jnp.ones((2, K)), jnp.ones(K))
  with pytest.raises(ValueError, match="must share one of float32, bfloat16, float16, got x "
                     "bfloat16 and w float32"):
    sj.matmul.sparse_input_matmul(jnp.ones((2, K), jnp.bfloat16), w)
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    sj.matmul.sparse_input_matmul(jnp.ones((2, K)), w, implementation="cuda")
  with pytest.raises(ValueError, match="x must be an array, got list"):
    sj.matmul.sparse_input_matmul([1.0] * K, w)
