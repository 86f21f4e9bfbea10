"""Block-sparse Dense layers (nnx and linen): static layouts, training, conversion."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import sparsejax as sj


def normal(seed, shape):
  """Host random values: jax.random.normal would compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def expand(layout, block_shape):
  return np.kron(np.asarray(layout), np.ones(block_shape, bool))


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_nnx_static_layout_computes_and_trains_only_its_blocks(implementation):
  layout = sj.matmul.butterfly_layout((4, 4), max_stride=1)  # 2 blocks per row
  inside = expand(layout, (16, 16))
  layer = sj.nn.BlockSparseLinear(64, 64, block_shape=(16, 16), layout=layout,
                                  implementation=implementation, rngs=nnx.Rngs(0))
  layer.bias[...] = normal(2, (64,))
  kernel, bias = layer.kernel[...], layer.bias[...]
  assert (np.asarray(kernel)[~inside] == 0).all() and (np.asarray(kernel) != 0).mean() > 0.4
  x = normal(1, (5, 64))

  def dense_loss(kernel, bias):
    return jnp.sum((x @ jnp.where(inside, kernel, 0) + bias[None]) ** 2)

  np.testing.assert_allclose(np.asarray(layer(x)), x @ kernel + bias[None], atol=1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  want_kernel, want_bias = jax.grad(dense_loss, argnums=(0, 1))(kernel, bias)
  g = np.asarray(grads["kernel"][...])
  assert (g[~inside] == 0).all() and (g[inside] != 0).all()
  np.testing.assert_allclose(g, want_kernel, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads["bias"][...]), want_bias, rtol=1e-4, atol=1e-4)
  assert "layout" not in grads  # the layout is not a trainable param


def test_linen_matches_nnx_and_low_rank():
  layout = sj.matmul.block_diagonal_layout((4, 2), 2)
  linen = sj.nn.BlockSparseDense(32, (16, 16), layout=layout, low_rank=3)
  x = normal(0, (7, 64))
  params = linen.init(jax.random.key(1), x)["params"]
  assert params["low_rank_a"].shape == (64, 3) and params["low_rank_b"].shape == (3, 32)
  assert (np.asarray(params["kernel"])[~expand(layout, (16, 16))] == 0).all()
  params = {**params, "low_rank_b": jnp.ones((3, 32)),
            "bias": normal(2, (32,))}
  layer = sj.nn.BlockSparseLinear(64, 32, block_shape=(16, 16), layout=layout, low_rank=3,
                                  rngs=nnx.Rngs(3))
  for name, value in params.items():
    getattr(layer, name)[...] = value
  low_rank = (x @ params["low_rank_a"]) @ params["low_rank_b"]
  want = x @ params["kernel"] + low_rank + params["bias"][None]
  got_linen = jax.jit(linen.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got_linen), np.asarray(want), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)), np.asarray(want),
                             atol=1e-4, rtol=1e-5)
  grads_linen = jax.jit(jax.grad(lambda p: jnp.sum(linen.apply({"params": p}, x) ** 2)))(params)
  grads_nnx = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  assert (np.asarray(grads_linen["kernel"])[~expand(layout, (16, 16))] == 0).all()
  for name, value in grads_linen.items():
    np.testing.assert_allclose(np.asarray(grads_nnx[name][...]), np.asarray(value), rtol=1e-4,
                               atol=1e-4, err_msg=name)


def test_bad_layer_input():
  with pytest.raises(ValueError, match=r"block_shape=\(16, 16\) does not divide w of shape "
                                       r"\(60, 32\)"):
    sj.nn.BlockSparseLinear(60, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"layout must be bool of shape \(4, 2\) \(the block grid "
                                       r"of a \(64, 32\) kernel in \(16, 16\) blocks\), got bool "
                                       r"of shape \(2, 4\)"):
    sj.nn.BlockSparseLinear(64, 32, block_shape=(16, 16), layout=np.ones((2, 4), bool),
                            rngs=nnx.Rngs(0))
  layer = sj.nn.BlockSparseLinear(64, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must end in in_features=64"):
    layer(jnp.ones((2, 32)))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = sj.nn.BlockSparseLinear(64, 256, block_shape=(16, 16), rngs=rngs)
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
  layouts = []
  for i in range(steps):
    idx = rng.choice(1400, 64, replace=False)
    step(model, optimizer, x_train[idx], y_train[idx])
    if i % 50 == 49:
      mask = np.asarray(sj.get_masks(optimizer.opt_state)["hidden"]["kernel"])
      layout = np.asarray(sj.matmul.block_layout(mask, (16, 16)))
      assert layout.sum() == 16  # exactly 25% of the 4 x 16 blocks
      kernel = np.asarray(model.hidden.kernel[...])
      assert (kernel[~mask] == 0).all()  # pruned blocks exactly zero
      layouts.append(layout)
  assert any((a != b).any() for a, b in zip(layouts, layouts[1:]))  # RigL moved blocks
  logits = model(x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  assert accuracy > 0.85
  # Conversion for inference: same outputs, now a block-sparse matmul.
  sj.nn.to_block_sparse(model)
  assert isinstance(model.hidden.layout, sj.nn.BlockLayout)
  assert int(model.hidden.layout[...].sum()) <= 16
  np.testing.assert_allclose(np.asarray(model(x_test)), np.asarray(logits), atol=1e-4)
