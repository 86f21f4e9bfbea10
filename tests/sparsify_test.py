"""The sparsify wrapper: custom methods, the update it returns, and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"dense": {"kernel": jax.random.normal(k[0], (6, 10)), "bias": jnp.zeros(10)},
          "out": {"kernel": jax.random.normal(k[1], (10, 2))}}


def gradient_pruning(sparsity, every):
  """The custom method from the SparsityMethod docstring."""
  def init(params):
    return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params), None

  def update(masks, state, params, grads, step):
    scores = jax.tree.map(lambda g, m: jnp.where(m, jnp.abs(g), -jnp.inf), grads, masks)
    return sj.masks_from_scores(scores, sparsity, distribution="uniform"), state

  return sj.SparsityMethod(init, update, sj.update_steps(update_every=every))


def test_custom_method():
  p = params()
  tx = sj.sparsify(optax.sgd(0.1), gradient_pruning(0.5, every=3))
  state = tx.init(p)
  update = jax.jit(tx.update)
  grads = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), p)
  for count in range(3):  # the masks of step 3 are set by the third update
    assert bool(sj.get_masks(state)["dense"]["kernel"].all())
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
  mask = np.asarray(sj.get_masks(state)["dense"]["kernel"])
  # The 30 largest gradients are the last 30 entries.
  np.testing.assert_array_equal(mask.reshape(-1), np.arange(60) >= 30)
  assert np.all(np.asarray(p["dense"]["kernel"]).reshape(-1)[:30] == 0)


def test_update_returns_minus_param_at_newly_pruned_entries():
  p = params()
  tx = sj.sparsify(optax.sgd(0.0), sj.magnitude(0.5))  # lr 0: only pruning moves weights
  state = tx.init(p)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
  mask = np.asarray(sj.get_masks(state)["dense"]["kernel"])
  u = np.asarray(updates["dense"]["kernel"])
  np.testing.assert_array_equal(u[~mask], -np.asarray(p["dense"]["kernel"])[~mask])
  assert np.all(u[mask] == 0)
  new = optax.apply_updates(p, updates)
  assert np.all(np.asarray(new["dense"]["kernel"])[~mask] == 0.0)


def test_update_without_params():
  tx = sj.sparsify(optax.adam(1e-3), sj.magnitude(0.5))
  state = tx.init(params())
  with pytest.raises(ValueError, match=re.escape("call tx.update(grads, state, params)")):
    tx.update(params(), state)


def test_update_with_mismatched_trees():
  tx = sj.sparsify(optax.adam(1e-3), sj.magnitude(0.5))
  p = params()
  state = tx.init(p)
  grads = jax.tree.map(jnp.ones_like, p)
  grads["out"]["kernel"] = jnp.ones((10, 3))
  with pytest.raises(ValueError, match=re.escape(
      "updates['out']['kernel']: mask shape (10, 2) != param shape (10, 3)")):
    tx.update(grads, state, p)
  other = {"dense": p["dense"]}
  with pytest.raises(ValueError, match="leaves in masks but not in params"):
    tx.update(other, state, other)


def test_method_must_be_a_sparsity_method():
  with pytest.raises(ValueError, match="method must be a sj.SparsityMethod"):
    sj.sparsify(optax.adam(1e-3), "magnitude")


def test_method_returning_bad_masks():
  bad_init = sj.SparsityMethod(
      init=lambda p: (jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), p), None),
      update=lambda m, s, p, g, t: (m, s), should_update=lambda t: t > 0)
  with pytest.raises(ValueError, match=r"init returned masks\['dense'\]\['kernel'\].*dtype float32"):
    sj.sparsify(optax.sgd(0.1), bad_init).init(params())
  bad_update = sj.SparsityMethod(
      init=lambda p: (jax.tree.map(lambda x: jnp.ones(x.shape, bool), p), None),
      update=lambda m, s, p, g, t: (jax.tree.map(lambda x: x[:1], m), s),
      should_update=lambda t: t > 0)
  tx = sj.sparsify(optax.sgd(0.1), bad_update)
  with pytest.raises(ValueError, match=r"update returned masks\['dense'\]\['kernel'\] with shape \(1, 10\)"):
    tx.update(params(), tx.init(params()), params())


@pytest.mark.parametrize("make", [
    lambda s: sj.magnitude(s),
    lambda s: sj.snip(s),
    lambda s: sj.static_random(s, key=jax.random.key(0)),
    lambda s: sj.init_masks(params(), s, key=jax.random.key(0)),
], ids=["magnitude", "snip", "static_random", "init_masks"])
@pytest.mark.parametrize("sparsity", [-0.5, 1.0, 2.0])
def test_sparsity_outside_unit_interval(make, sparsity):
  with pytest.raises(ValueError, match=rf"sparsity={sparsity} must lie in \[0, 1\)"):
    make(sparsity)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="update_every=0 must be an integer >= 1"):
    sj.magnitude(0.5, update_every=0)
  with pytest.raises(ValueError, match="update_every=2.5 must be an integer >= 1"):
    sj.magnitude(0.5, update_every=2.5)
  with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
    sj.static_random(0.5, key=0)
  with pytest.raises(ValueError, match="unknown distribution 'blocks'"):
    sj.snip(0.5, distribution="blocks")


def test_get_masks_without_sparsify_state():
  with pytest.raises(ValueError, match="holds no SparsifyState"):
    sj.get_masks(optax.adam(1e-3).init(params()))
