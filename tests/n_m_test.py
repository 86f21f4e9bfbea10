"""N:M sparsity: exact groups, transposable masks, estimators, ramps, mask timing.

The storage format (`sj.matmul.compress_n_m`, `decompress_n_m`, `n_m_matmul`)
is tested in `n_m_format_test.py`.
"""

import itertools
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def normal(seed, shape):
  """Host random values: jax.random.normal would compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def reference_n_m(scores, n, m, axis):
  s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
  s = np.where(np.isnan(s), -np.inf, s)
  groups = s.reshape(s.shape[:-1] + (s.shape[-1] // m, m))
  order = np.argsort(-groups, axis=-1, kind="stable")
  mask = np.zeros_like(groups, bool)
  np.put_along_axis(mask, order[..., :n], True, axis=-1)
  return np.moveaxis(mask.reshape(s.shape), -1, axis)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=st.data())
def test_n_m_mask_is_exact(data):
  m = data.draw(st.sampled_from([1, 2, 4, 8]))
  n = data.draw(st.integers(0, m))
  ndim = data.draw(st.integers(1, 3))
  axis = data.draw(st.integers(-ndim, ndim - 1))
  shape = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
  shape[axis] *= m
  values = data.draw(st.sampled_from(["normal", "ties"]))
  scores = np.random.default_rng(len(shape) + n).standard_normal(shape).astype(np.float32)
  if values == "ties":
    scores = np.round(scores)
  mask = np.asarray(jax.jit(lambda s: sj.n_m_mask(s, n, m, axis=axis))(scores))
  groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
  assert np.all(groups.sum(-1) == n)
  np.testing.assert_array_equal(mask, reference_n_m(scores, n, m, axis))


def test_default_axis_is_minus_two():
  scores = np.random.default_rng(0).standard_normal((2, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(sj.n_m_mask(scores, 2, 4), reference_n_m(scores, 2, 4, -2))
  params = {"w": jnp.asarray(scores[0])}  # an (in, out) kernel: groups run over the 8 inputs
  state = sj.sparsify(optax.sgd(0.1), sj.n_m(2, 4)).init(params)
  np.testing.assert_array_equal(sj.get_masks(state)["w"],
                                reference_n_m(np.abs(scores[0]), 2, 4, -2))


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (2, 5)])
def test_transposable_mask_is_n_m_both_ways_and_optimal(n, m):
  scores = jnp.abs(normal(n * 10 + m, (2 * m, 3 * m)))
  mask = np.asarray(jax.jit(lambda s: sj.transposable_n_m_mask(s, n, m))(scores))
  assert np.all(mask.reshape(2 * m, 3, m).sum(-1) == n)  # rows: n per group of m
  assert np.all(mask.reshape(2, m, 3 * m).sum(1) == n)  # columns too
  # The first tile keeps the most score among all patterns (brute force).
  tile = np.asarray(scores)[:m, :m]
  best = max(tile[np.reshape(np.array(p, bool), (m, m))].sum()
             for p in itertools.product([0, 1], repeat=m * m)
             if np.all(np.reshape(p, (m, m)).sum(0) == n)
             and np.all(np.reshape(p, (m, m)).sum(1) == n)) if m == 4 else None
  if best is not None:
    np.testing.assert_allclose(tile[mask[:m, :m]].sum(), best, rtol=1e-6)


def test_masked_weight_gradients_match_hand_derivation():
  w = jnp.array([1.0, -2.0, 3.0, -4.0])
  mask = jnp.array([True, False, True, False])
  cot = jnp.array([0.5, 0.25, -1.0, 2.0])
  for scale, decay in [(0.0, 0.0), (1.0, 0.0), (1.0, 0.1), (0.3, 0.1)]:
    f = lambda w, s=scale, d=decay: jnp.sum(cot * sj.masked_weight(w, mask, s, d))
    grad = jax.jit(jax.grad(f))(w)
    expected = np.where(mask, cot, scale * cot + decay * w)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
  np.testing.assert_array_equal(sj.masked_weight(w, mask), [1.0, 0.0, 3.0, 0.0])


def loss(params, x):
  return jnp.sum((x @ params["w"]) ** 2)


@pytest.mark.parametrize("estimator", ["hard", "ste", "sr_ste", "decay"])
def test_estimators_give_hand_derived_updates(estimator):
  w = normal(0, (8, 3))
  x = normal(1, (5, 8))
  kwargs = {"grad_scale": lambda step: 0.25} if estimator == "decay" else {}
  if estimator in ("sr_ste", "decay"):
    kwargs["decay"] = 0.1
  tx = sj.sparsify(optax.sgd(1.0), sj.n_m(2, 4, axis=0, estimator=estimator, **kwargs))
  params = {"w": w}
  state = tx.init(params)
  masks = sj.get_masks(state)

  def step(params, state):
    grads = jax.grad(lambda p: loss(sj.apply_masks(p, sj.get_masks(state), ste=True), x))(params)
    return tx.update(grads, state, params)

  updates, state = jax.jit(step)(params, state)
  m = np.asarray(masks["w"])
  g = np.asarray(jax.grad(lambda v: jnp.sum((x @ v) ** 2))(jnp.where(m, w, 0.0)))
  pruned = {"hard": 0 * g, "ste": g, "sr_ste": g + 0.1 * np.asarray(w),
            "decay": 0.25 * g + 0.25 * 0.1 * np.asarray(w)}[estimator]
  np.testing.assert_allclose(-np.asarray(updates["w"]), np.where(m, g, pruned), rtol=1e-5,
                             atol=1e-6)
  # The masks of step 1 are recomputed from the weights this update saw.
  new = reference_n_m(np.abs(np.asarray(w)), 2, 4, 0)
  np.testing.assert_array_equal(sj.get_masks(state)["w"], new)
  assert int(state.method_state.flips) == np.sum(new != m)


def test_decay_schedule_reaches_zero_and_params_stay_dense():
  w = normal(0, (8, 4))
  x = normal(1, (5, 8))
  method = sj.n_m(2, 4, axis=0, estimator="decay", grad_scale=optax.linear_schedule(1.0, 0.0, 4),
                  update_every=100)
  tx = sj.sparsify(optax.sgd(0.1), method)
  params, state = {"w": w}, tx.init({"w": w})
  mask = np.asarray(sj.get_masks(state)["w"])

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss(sj.apply_masks(p, sj.get_masks(state), ste=True), x))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  moved = []
  for _ in range(6):
    params, state, updates = step(params, state)
    moved.append(np.abs(np.asarray(updates["w"])[~mask]).max())
  assert moved[0] > 0 and moved[4] == 0 and moved[5] == 0  # scale 1, ..., 0 from step 4
  assert np.count_nonzero(np.asarray(params["w"])[~mask]) > 0  # shadow weights stay dense
  exported = np.asarray(sj.sparse_params(params, state)["w"])
  assert np.all(exported[~mask] == 0) and np.all(exported.reshape(2, 4, 4).astype(bool).sum(1) == 2)


def test_n_m_ramp_is_exact_at_every_step():
  """The update call with count t sets the masks of step t + 1, from the weights it saw."""
  n = sj.piecewise({0: 4, 3: 2, 6: 1})  # 4:4 -> 2:4 -> 1:4
  n_at = lambda step: 4 if step < 3 else 2 if step < 6 else 1
  tx = sj.sparsify(optax.sgd(0.5), sj.n_m(n, 4, estimator="ste"))  # steps that reorder weights
  params = {"w": normal(0, (8, 5))}
  state = tx.init(params)
  assert np.all(np.asarray(sj.get_masks(state)["w"]))  # step 0 (from init): 4:4
  update = jax.jit(tx.update)
  for step in range(9):
    grads = {"w": normal((1, step), (8, 5))}
    updates, state = update(grads, state, params)
    seen, params = params, optax.apply_updates(params, updates)
    mask = np.asarray(sj.get_masks(state)["w"])
    assert np.all(mask.reshape(2, 4, 5).sum(1) == n_at(step + 1)), step
    np.testing.assert_array_equal(mask, reference_n_m(np.abs(seen["w"]), n_at(step + 1), 4, -2))


def test_masks_change_at_update_steps_from_the_weights_of_that_step():
  """update_every=2: step 0's masks come from init, steps 2 and 4 from the updates before them."""
  tx = sj.sparsify(optax.sgd(0.5), sj.n_m(2, 4, estimator="ste", update_every=2))
  params = {"w": normal(0, (8, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = [np.asarray(params["w"])]  # the weights of steps 0, 1, ...
  for step in range(6):
    assert int(state.count) == step
    seen = 0 if step < 2 else 2 * (step // 2) - 1  # the weights the last mask update saw
    np.testing.assert_array_equal(sj.get_masks(state)["w"],
                                  reference_n_m(np.abs(history[seen]), 2, 4, -2))
    grads = {"w": normal((1, step), (8, 6))}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(np.asarray(params["w"]))
  # Not vacuous: the weights of steps 0, 1 and 2 give three different masks.
  first = [reference_n_m(np.abs(w), 2, 4, -2) for w in history[:3]]
  assert np.any(first[0] != first[1]) and np.any(first[1] != first[2])
  assert np.any(first[0] != first[2])


def test_flips_count_mask_changes():
  old = {"a": jnp.array([True, False, True]), "b": None}
  new = {"a": jnp.array([False, False, True]), "b": None}
  assert int(sj.mask_flips(old, new)) == 1


def test_transposable_training_keeps_both_directions():
  tx = sj.sparsify(optax.sgd(0.5), sj.n_m(2, 4, estimator="sr_ste", transposable=True))
  params = {"w": normal(0, (8, 8))}
  state = tx.init(params)
  for i in range(3):
    grads = {"w": normal(i, (8, 8))}
    updates, state = jax.jit(tx.update)(grads, state, params)
    seen, params = params, optax.apply_updates(params, updates)
    mask = np.asarray(sj.get_masks(state)["w"])
    assert np.all(mask.reshape(8, 2, 4).sum(-1) == 2) and np.all(mask.reshape(2, 4, 8).sum(1) == 2)
    # Recomputed from the weights this update saw (update_every=1).
    np.testing.assert_array_equal(mask, sj.transposable_n_m_mask(jnp.abs(seen["w"]), 2, 4))


@pytest.mark.parametrize("make, message", [
    (lambda: sj.n_m(5, 4), r"n=5 must be an integer with 0 <= n <= m=4"),
    (lambda: sj.n_m(2, 4, estimator="magic"), "estimator='magic' must be one of"),
    (lambda: sj.n_m(2, 4, estimator="hard", decay=1e-4), "decay applies to the sr_ste"),
    (lambda: sj.n_m(2, 4, estimator="decay"), "estimator='decay' needs grad_scale"),
    (lambda: sj.n_m(2, 4, estimator="ste", grad_scale=0.5), "grad_scale applies to the decay"),
    (lambda: sj.n_m(2, 4, update_every=0), "update_every=0 must be an integer >= 1"),
    (lambda: sj.n_m(sj.piecewise({0: 2}), 4, transposable=True),
     "transposable masks need a fixed integer n"),
    (lambda: sj.n_m(2, 4, granularity=sj.Block((2, 2))), r"n_m: granularity=.* is not supported"),
    (lambda: sj.transposable_n_m_mask(jnp.ones((8, 6)), 2, 4), "multiples of m=4"),
])
def test_bad_input(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_bad_leaves_are_named():
  params = {"dense": {"kernel": jnp.ones((6, 8))}}
  with pytest.raises(ValueError, match=re.escape(
      "m=4 does not divide axis 0 (length 6) of params['dense']['kernel'] of shape (6, 8)")):
    sj.sparsify(optax.sgd(0.1), sj.n_m(2, 4)).init(params)  # the default axis is -2
  with pytest.raises(ValueError, match=re.escape(
      "axis=2 is out of range for params['dense']['kernel'] of shape (6, 8)")):
    sj.sparsify(optax.sgd(0.1), sj.n_m(2, 4, axis=2)).init(params)
