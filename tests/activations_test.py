"""Activation sparsity: top-k with a straight-through gradient, ReLU², ProSparse's penalty."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

act = sj.activations


def test_topk_keeps_exactly_k_per_row_and_passes_the_gradient_straight_through():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 32)), jnp.float32)
  for k, axis, kept in [(4, -1, 4), (0.25, -1, 8), (2, 1, 2)]:
    y = jax.jit(lambda x, k=k, axis=axis: act.topk(x, k, axis=axis))(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    nonzero = np.asarray(y != 0).sum(axis=axis)
    np.testing.assert_array_equal(nonzero, kept)
    # The kept entries are the largest in magnitude and keep their values.
    mags = np.abs(np.moveaxis(np.asarray(x), axis, -1))
    kept_vals = np.moveaxis(np.asarray(y), axis, -1)
    threshold = np.sort(mags, axis=-1)[..., -kept][..., None]
    np.testing.assert_array_equal(kept_vals != 0, mags >= threshold)
    np.testing.assert_array_equal(kept_vals[kept_vals != 0],
                                  np.moveaxis(np.asarray(x), axis, -1)[kept_vals != 0])
  w = jnp.asarray(np.random.default_rng(1).standard_normal((6, 5, 32)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(w * act.topk(x, 4)))(x)
  np.testing.assert_array_equal(grad, w)  # the identity, dropped entries included


def test_relu2_and_measured_sparsity():
  x = jnp.array([-2.0, -0.5, 0.0, 0.5, 3.0])
  np.testing.assert_array_equal(act.relu2(x), [0.0, 0.0, 0.0, 0.25, 9.0])
  got = act.sparsity({"a": act.relu2(x), "b": jnp.ones(4)})
  np.testing.assert_allclose([got["a"], got["b"]], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(act.sparsity(x, threshold=0.5), 0.6, rtol=1e-6)


def test_prosparse_schedule_rises_in_stages_and_the_penalty_follows_it():
  schedule = act.prosparse_schedule(1e-2, warmup_steps=10, stages=4, stage_steps=5)
  got = [float(schedule(t)) for t in (0, 9, 10, 14, 15, 25, 29, 1000)]
  np.testing.assert_allclose(got, [0, 0, 2.5e-3, 2.5e-3, 5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6)
  h = {"ffn0": jnp.full((4, 8), -2.0), "ffn1": jnp.ones((4, 8))}
  np.testing.assert_allclose(act.l1_penalty(h, schedule, 30), 1e-2 * 1.5, rtol=1e-6)
  np.testing.assert_allclose(act.l1_penalty(h, 0.5), 0.75, rtol=1e-6)
  # The penalty's gradient drives activations to zero: sign(a) * strength / size.
  g = jax.grad(lambda a: act.l1_penalty(a, 1.0))(jnp.array([-1.0, 2.0]))
  np.testing.assert_allclose(g, [-0.5, 0.5])


def test_bad_input():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"k=9 must be in \[1, 8\]"):
    act.topk(x, 9)
  with pytest.raises(ValueError, match=r"k=1.5 as a fraction must lie in \(0, 1\]"):
    act.topk(x, 1.5)
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    act.topk(x, 2, axis=2)
  with pytest.raises(ValueError, match="strength is a schedule: pass the training step"):
    act.l1_penalty(x, act.prosparse_schedule(1.0, warmup_steps=0, stage_steps=1))
  with pytest.raises(ValueError, match="stage_steps=0 must be an integer >= 1"):
    act.prosparse_schedule(1.0, warmup_steps=0, stage_steps=0)
