"""N:M storage (`compress_n_m`, `decompress_n_m`, `n_m_matmul`): round trip, matmul, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

compress, decompress = sj.matmul.compress_n_m, sj.matmul.decompress_n_m
matmul = sj.matmul.n_m_matmul


def normal(seed, shape):
  """Host random values: jax.random.normal would compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_round_trip_under_jit(axis):
  w = normal(axis + 5, (8, 12, 4))
  c = jax.jit(lambda w: compress(w, 2, 4, axis=axis))(w)
  assert isinstance(c, sj.matmul.NMWeights)
  assert (c.n, c.m, c.axis, c.shape) == (2, 4, axis % 3, (8, 12, 4))  # static data survives jit
  assert c.indices.dtype == jnp.int8 and c.values.dtype == w.dtype
  assert c.values.shape[-1] == w.shape[axis] // 2
  assert len(jax.tree_util.tree_leaves(c)) == 2  # only values and indices are traced
  want = jnp.where(sj.n_m_mask(jnp.abs(w), 2, 4, axis=axis), w, 0.0)
  np.testing.assert_array_equal(jax.jit(decompress)(c), want)


def test_default_axis_and_given_mask():
  w = normal(0, (8, 4))
  assert compress(w, 2, 4).axis == 0  # -2: the inputs of an (in, out) kernel
  mask = jnp.zeros((8, 4), bool).at[1::4].set(True)  # 1:4, not the magnitude choice
  np.testing.assert_array_equal(decompress(compress(w, 1, 4, mask=mask)), jnp.where(mask, w, 0))
  # Under jit a mask is not checked; groups with too few kept entries store zeros.
  c = jax.jit(lambda w, mask: compress(w, 2, 4, mask=mask))(w, mask)
  np.testing.assert_array_equal(decompress(c), jnp.where(mask, w, 0))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (1, 8), (4, 8), (0, 4)])
def test_matmul_equals_dense_masked_matmul(n, m):
  w = normal(m, (32, 6))
  x = normal(n, (3, 7, 32))
  c = compress(w, n, m)
  dense = x @ jnp.where(sj.n_m_mask(jnp.abs(w), n, m), w, 0.0)
  y = jax.jit(matmul)(x, c)
  assert y.shape == (3, 7, 6) and y.dtype == x.dtype
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) ** 2)))(x)
  np.testing.assert_allclose(grad(lambda x: matmul(x, c)), grad(lambda x: x @ decompress(c)),
                             rtol=1e-4, atol=1e-4)


def raises(message, fn, *args, **kwargs):
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("n, m, message", [
    (3, 2, "n=3 must be an integer with 0 <= n <= m=2"),
    (2.5, 4, "n=2.5 must be an integer with 0 <= n <= m=4"),
    (None, 4, "n=None must be an integer with 0 <= n <= m=4"),
    (2, 0, "m=0 must be an integer >= 1"),
    (2, 4.0, "m=4.0 must be an integer >= 1"),
    (lambda step: 2, 4, "must be a Python integer: it fixes the shape of the stored values"),
])
def test_bad_pattern(n, m, message):
  raises(message, compress, jnp.ones((8, 8)), n, m)


def test_bad_input():
  w = normal(0, (8, 4))
  raises("must be a Python integer", jax.jit(lambda n: compress(w, n, 4)), 2)
  raises("m=4 does not divide axis 0 (length 6) of w of shape (6, 8)", compress,
         jnp.ones((6, 8)), 2, 4)
  raises("axis=2 is out of range for w of shape (8, 4)", compress, w, 2, 4, axis=2)
  raises("mask must be bool of the shape of w (8, 4), got bool of shape (4, 4)", compress, w, 2,
         4, mask=jnp.ones((4, 4), bool))
  raises("mask must be bool of the shape of w (8, 4), got float32 of shape (8, 4)", compress, w,
         2, 4, mask=jnp.ones((8, 4)))
  raises("mask is not 2:4 along axis 0: every group of 4 along it needs exactly 2 True entries",
         compress, w, 2, 4, mask=jnp.ones((8, 4), bool))
  c = compress(w, 2, 4)
  # Arrays that do not match the static data were a silent wrong answer.
  bad = sj.matmul.NMWeights(c.values, c.indices, 1, 4, 0, (8, 4))
  raises("decompress_n_m: c.values and c.indices of shapes (4, 4) and (4, 4) do not hold a 1:4 "
         "array of shape (8, 4) along axis 0: expected (4, 2) for both", decompress, bad)
  raises("n_m_matmul: c must be an NMWeights (from sj.matmul.compress_n_m), got tuple", matmul,
         jnp.ones((3, 8)), (c.values, c.indices))
  raises("x of shape (3, 5) cannot multiply a compressed w of shape (8, 4): x.shape[-1] must be 8",
         matmul, jnp.ones((3, 5)), c)
  raises("n_m_matmul needs c = compress_n_m(w, n, m, axis=-2) of a 2-d w (K, N), grouped along "
         "K; got w of shape (8, 4) grouped along axis 1", matmul, jnp.ones((3, 8)),
         compress(w, 2, 4, axis=1))
  raises("got w of shape (8, 4, 4) grouped along axis 1", matmul, jnp.ones((3, 4)),
         compress(jnp.ones((8, 4, 4)), 2, 4))
