"""Block-sparse Dense layers (nnx and linen): static patterns, training, conversion."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import sparsejax as sj


def expand(mask, block_shape):
  return np.kron(np.asarray(mask), np.ones(block_shape, bool))


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_nnx_static_pattern_computes_and_trains_only_its_blocks(implementation):
  mask = sj.butterfly_mask((4, 4), max_stride=1)  # 2 blocks per row
  layer = sj.flax.BlockSparseLinear(64, 64, block_shape=(16, 16), block_mask=mask,
                                    implementation=implementation, rngs=nnx.Rngs(0))
  kernel = np.asarray(layer.kernel[...])
  assert (kernel[~expand(mask, (16, 16))] == 0).all() and (kernel != 0).mean() > 0.4
  x = jax.random.normal(jax.random.key(1), (5, 64))
  np.testing.assert_allclose(np.asarray(layer(x)), x @ kernel + layer.bias[...][None], atol=1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  g = np.asarray(grads["kernel"][...])
  assert (g[~expand(mask, (16, 16))] == 0).all() and (g[expand(mask, (16, 16))] != 0).all()
  assert "block_mask" not in grads  # the pattern is not a trainable param


def test_linen_matches_nnx_and_low_rank():
  mask = sj.block_diagonal_mask((4, 2), 2)
  layer = sj.flax.BlockSparseDense(32, (16, 16), block_mask=mask, low_rank=3)
  x = jax.random.normal(jax.random.key(0), (7, 64))
  params = layer.init(jax.random.key(1), x)["params"]
  assert params["low_rank_a"].shape == (64, 3) and params["low_rank_b"].shape == (3, 32)
  params = {**params, "low_rank_b": jnp.ones((3, 32))}
  kernel = np.asarray(params["kernel"])
  assert (kernel[~expand(mask, (16, 16))] == 0).all()
  want = x @ kernel + (x @ params["low_rank_a"]) @ params["low_rank_b"] + params["bias"][None]
  got = jax.jit(layer.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
  assert (np.asarray(grads["kernel"])[~expand(mask, (16, 16))] == 0).all()


def test_bad_layer_input():
  with pytest.raises(ValueError, match=r"block_shape=\(16, 16\) does not divide w of shape "
                                       r"\(60, 32\)"):
    sj.flax.BlockSparseLinear(60, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"block_mask must be bool of shape \(4, 2\)"):
    sj.flax.BlockSparseLinear(64, 32, block_shape=(16, 16), block_mask=np.ones((2, 4), bool),
                              rngs=nnx.Rngs(0))
  layer = sj.flax.BlockSparseLinear(64, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must end in in_features=64"):
    layer(jnp.ones((2, 32)))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = sj.flax.BlockSparseLinear(64, 256, block_shape=(16, 16), rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_block_rigl_trains_on_digits_with_exact_block_sparsity_then_converts():
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)
  x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
  model = MLP(nnx.Rngs(0))
  steps = 300
  method = sj.rigl(0.75, end_step=steps, update_every=50, granularity=sj.Block((16, 16)),
                   distribution="uniform", key=jax.random.key(0))
  optimizer = nnx.Optimizer(model, sj.sparsify(optax.adam(3e-3), method, where="hidden.*kernel"),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  rng = np.random.default_rng(0)
  patterns = []
  for i in range(steps):
    idx = rng.choice(1400, 64, replace=False)
    step(model, optimizer, x_train[idx], y_train[idx])
    if i % 50 == 49:
      mask = np.asarray(sj.get_masks(optimizer.opt_state)["hidden"]["kernel"])
      blocks = np.asarray(sj.block_mask(mask, (16, 16)))
      assert blocks.sum() == 16  # exactly 25% of the 4 x 16 blocks
      kernel = np.asarray(model.hidden.kernel[...])
      assert (kernel[~mask] == 0).all()  # pruned blocks exactly zero
      patterns.append(blocks)
  assert any((a != b).any() for a, b in zip(patterns, patterns[1:]))  # RigL moved blocks
  logits = model(x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  assert accuracy > 0.85
  # Conversion for inference: same outputs, now a block-sparse matmul.
  sj.flax.to_block_sparse(model)
  assert model.hidden.block_mask is not None and int(model.hidden.block_mask[...].sum()) <= 16
  np.testing.assert_allclose(np.asarray(model(x_test)), np.asarray(logits), atol=1e-4)
