"""Dynamic sparse training: fixed budgets, what is dropped and grown, state resets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def normal(seed, shape):
  """Host random values: jax.random.normal would compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def make_params(key=0):
  return {"d0": {"kernel": normal((key, 0), (16, 32)), "bias": jnp.zeros(32)},
          "d1": {"kernel": normal((key, 1), (32, 8)) * 0.5}}


def loss_fn(params, x):
  h = jnp.tanh(x @ params["d0"]["kernel"] + params["d0"]["bias"][None])
  return jnp.mean((h @ params["d1"]["kernel"] - 1.0) ** 2)


def run(method, inner=None, steps=12, params=None, seed=0):
  """Trains and returns the params, masks and gradients seen at every step."""
  tx = sj.sparsify(inner or optax.sgd(0.1), method)
  params = make_params() if params is None else params
  state = tx.init(params)
  params = sj.apply_masks(params, sj.get_masks(state))

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  history = [(params, sj.get_masks(state), None, state)]
  for i in range(steps):
    x = normal((seed, i), (16, 16))
    params, state, grads = step(params, state, x)
    history.append((params, sj.get_masks(state), grads, state))
  return history


def kernels(tree):
  return [np.asarray(tree["d0"]["kernel"]), np.asarray(tree["d1"]["kernel"])]


DST = {
    "set": lambda **kw: sj.set_evolution(0.75, end_step=10, update_every=3,
                                         key=jax.random.key(1), **kw),
    "rigl": lambda **kw: sj.rigl(0.75, end_step=10, update_every=3, key=jax.random.key(1), **kw),
    "rigl_block": lambda **kw: sj.rigl(0.75, end_step=10, update_every=3, key=jax.random.key(1),
                                       granularity=sj.Block((4, 4)), **kw),
}


@pytest.mark.parametrize("name", sorted(DST))
def test_budget_is_fixed_and_swaps_are_disjoint(name):
  history = run(DST[name](drop_fraction=0.5))
  budget = [int(m.sum()) for m in kernels(history[0][1])]
  swapped = 0
  for (_, old, _, _), (params, new, _, _) in zip(history, history[1:]):
    assert [int(m.sum()) for m in kernels(new)] == budget
    for o, n, p in zip(kernels(old), kernels(new), kernels(params)):
      dropped, grown = o & ~n, n & ~o
      assert dropped.sum() == grown.sum()
      swapped += grown.sum()
      assert np.all(p[~n] == 0)
  assert swapped > 0


def test_dropped_weights_are_not_regrown_in_the_same_step():
  # Dropping every active weight at 25% density: all growth must come from
  # weights that were inactive before the update.
  history = run(sj.rigl(0.75, end_step=10, update_every=3, drop_fraction=1.0,
                        distribution="uniform", key=jax.random.key(0)))
  # history[i] holds the state after i updates, with the masks of step i:
  # the masks of step 3 are set by the third update.
  _, old, _, _ = history[2]
  _, new, _, _ = history[3]
  for o, n in zip(kernels(old), kernels(new)):
    assert n.sum() == o.sum() and not np.any(o & n)


def test_rigl_drops_smallest_magnitudes_and_grows_largest_gradients():
  history = run(sj.rigl(0.75, end_step=10, update_every=3, drop_fraction=0.25,
                        distribution="uniform", key=jax.random.key(0)))
  params, old, _, _ = history[2]
  _, new, grads, _ = history[3]  # the third update saw these params and grads
  for w, g, o, n in zip(kernels(params), kernels(grads), kernels(old), kernels(new)):
    k, n_swap = int(o.sum()), int(round(0.25 * o.sum()))
    dropped, grown = o & ~n, n & ~o
    assert dropped.sum() == grown.sum() == n_swap
    assert np.abs(w[dropped]).max() <= np.abs(w[o & n]).min()
    assert np.abs(g[grown]).min() >= np.abs(g[~o & ~n]).max()
    assert k == n.sum()


def test_set_growth_is_random_and_reproducible():
  a = run(DST["set"](drop_fraction=0.5))
  b = run(DST["set"](drop_fraction=0.5))
  c = run(sj.set_evolution(0.75, end_step=10, update_every=3, drop_fraction=0.5,
                           key=jax.random.key(7)))
  for x, y in zip(kernels(a[-1][1]), kernels(b[-1][1])):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(kernels(a[-1][1]), kernels(c[-1][1])))


@pytest.mark.parametrize("inner, sgd", [(lambda: optax.sgd(0.1), True),
                                        (lambda: optax.adam(0.1), False)], ids=["sgd", "adam"])
def test_grown_weights_are_zero_after_the_step_that_grows_them(inner, sgd):
  history = run(sj.rigl(0.75, end_step=10, update_every=3, drop_fraction=0.5,
                        key=jax.random.key(0)), inner=inner())
  before, old, _, _ = history[2]
  after, new, _, state = history[3]  # the third update grows connections
  later, _, grads, _ = history[4]  # the next one trains them
  inner_leaves = [np.asarray(x) for x in jax.tree.leaves(state.inner_state)]
  for p0, p1, p2, g, o, n in zip(kernels(before), kernels(after), kernels(later), kernels(grads),
                                 kernels(old), kernels(new)):
    grown = n & ~o
    assert grown.any()
    assert np.all(p0[grown] == 0) and np.all(p1[grown] == 0)  # exactly zero after growing
    for s in [x for x in inner_leaves if x.shape == n.shape]:
      assert np.all(s[grown] == 0)  # with zero optimizer state
    assert np.all(p2[grown] != 0)  # their first update comes at the next step
    if sgd:
      np.testing.assert_allclose(p2[grown], -0.1 * g[grown], rtol=1e-6)  # one step from zero


@pytest.mark.parametrize("inner", [
    lambda: optax.sgd(0.1, momentum=0.9),
    lambda: optax.adam(1e-2),
    lambda: optax.adamw(1e-2, weight_decay=0.1),
    lambda: optax.lion(1e-3),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
], ids=["sgd_momentum", "adam", "adamw", "lion", "chain_clip_adam"])
def test_optimizer_state_of_inactive_and_regrown_weights_is_zero(inner):
  history = run(DST["rigl"](drop_fraction=0.5), inner=inner())

  def state_leaves(state, shape):
    return [np.asarray(x) for x in jax.tree.leaves(state.inner_state) if np.shape(x) == shape]

  regrown = 0
  for (_, old, _, before), (_, new, _, after) in zip(history, history[1:]):
    for o, n in zip(kernels(old), kernels(new)):
      assert state_leaves(after, n.shape)
      for s in state_leaves(after, n.shape):
        assert np.all(s[~n] == 0)  # inactive entries hold zero state
      grown = n & ~o
      regrown += grown.sum()
      for s in state_leaves(before, n.shape):
        assert np.all(s[grown] == 0)  # so a regrown entry starts from zero state
  assert regrown > 0


def test_drop_and_grow_with_an_exploration_bonus():
  """A user-written variant: growth prefers connections inactive for longest."""

  def explore(params, grads, masks, ctx):
    return jax.tree.map(lambda idle: idle.astype(jnp.float32), ctx.state)  # gradients ignored

  idle = (lambda masks: jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.int32), masks),
          lambda idle, old, new, step: jax.tree.map(lambda i, m: jnp.where(m, 0, i + 1), idle, new))
  method = sj.drop_and_grow(0.75, drop_score=sj.magnitude_score, grow_score=explore,
                            score_state=idle, end_step=20, update_every=2, drop_fraction=0.25,
                            distribution="uniform", key=jax.random.key(0))
  history = run(method, steps=8)
  total_grown = 0
  for (_, old, _, prev), (_, new, _, state) in zip(history, history[1:]):
    counters = state.method_state.score_state
    before = prev.method_state.score_state
    for o, n, c_before, c in zip(kernels(old), kernels(new), kernels(before), kernels(counters)):
      assert np.all(c[n] == 0)
      grown = n & ~o
      total_grown += int(grown.sum())
      if grown.any():  # grown entries had the longest idle counts
        assert c_before[grown].min() >= c_before[~o & ~n].max()
  assert total_grown > 0  # the property above was checked at least once


def test_granet_dense_to_sparse_and_sparse_to_sparse():
  for init_sparsity in [0.0, 0.5]:
    method = sj.granet(0.8, init_sparsity=init_sparsity, end_step=9, update_every=3,
                       drop_fraction=0.3, distribution="uniform", key=jax.random.key(0))
    history = run(method)
    schedule = sj.cubic_schedule(0.8, init_sparsity=init_sparsity, end_step=9)
    regrown = 0
    for t, ((_, old, _, _), (params, new, _, _)) in enumerate(zip(history, history[1:])):
      last = 3 * (min(t + 1, 9) // 3)  # update t sets the masks of step t + 1
      s = float(schedule(last)) if t + 1 >= 3 else init_sparsity
      for o, n, p in zip(kernels(old), kernels(new), kernels(params)):
        assert n.sum() == round(float(np.float32(1 - np.float32(s)) * n.size)), (t, s)
        assert np.all(p[~n] == 0)
        regrown += (n & ~o).sum()
    assert regrown > 0  # pruning alone never turns a weight back on


def test_srigl_constant_fan_in_and_ablation():
  params = make_params()
  # Eight dead neurons: zero inputs and outputs, so zero weights and gradients.
  params["d0"]["kernel"] = params["d0"]["kernel"].at[:, :8].set(0.0)
  params["d1"]["kernel"] = params["d1"]["kernel"].at[:8, :].set(0.0)
  method = sj.srigl(0.75, end_step=20, update_every=2, drop_fraction=0.3,
                    distribution="uniform", ablation_threshold=0.5, key=jax.random.key(0))
  history = run(method, params=params, steps=8)
  fan_in = 4  # round(0.25 * 16)
  for _, masks, _, state in history:
    m = kernels(masks)[0]
    alive = np.asarray(state.method_state.alive["d0"]["kernel"])
    counts = m.sum(axis=0)
    assert np.all(counts[~alive] == 0)
    assert len(set(counts[alive].tolist())) == 1  # constant fan-in
    assert counts[alive][0] * alive.sum() <= fan_in * 32  # within the budget
  assert not alive[:8].any()  # the dead neurons were ablated
  assert counts[alive][0] == (fan_in * 32) // alive.sum() > fan_in  # their budget went to the rest
  no_ablation = run(sj.srigl(0.75, end_step=20, update_every=2, ablation_threshold=0.0,
                             distribution="uniform", key=jax.random.key(0)), params=params)
  assert np.all(kernels(no_ablation[-1][1])[0].sum(axis=0) == fan_in)


@pytest.mark.parametrize("make, message", [
    (lambda: sj.rigl(0.9, end_step=10, drop_fraction=1.5, key=jax.random.key(0)),
     r"drop_fraction=1.5 must lie in \[0, 1\]"),
    (lambda: sj.set_evolution(0.9, end_step=10, drop_fraction=-0.1, key=jax.random.key(0)),
     r"drop_fraction=-0.1 must lie in \[0, 1\]"),
    (lambda: sj.rigl(0.9, end_step=10, update_every=0, key=jax.random.key(0)),
     "update_every=0 must be an integer >= 1"),
    (lambda: sj.granet(0.9, begin_step=50, end_step=10, key=jax.random.key(0)),
     "end_step=10 must be >= begin_step=50"),
    (lambda: sj.srigl(0.9, end_step=10, distribution="global", key=jax.random.key(0)),
     "srigl needs a per-leaf density"),
    (lambda: sj.rigl(1.0, end_step=10, key=jax.random.key(0)),
     r"sparsity=1.0 must lie in \[0, 1\)"),
    (lambda: sj.srigl(0.9, end_step=10, ablation_threshold=2.0, key=jax.random.key(0)),
     r"ablation_threshold=2.0 must lie in \[0, 1\]"),
])
def test_bad_hyperparameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_block_shape_must_divide_every_leaf():
  tx = sj.sparsify(optax.sgd(0.1), sj.rigl(0.9, end_step=10, key=jax.random.key(0),
                                          granularity=sj.Block((5, 5))))
  with pytest.raises(ValueError, match=re.escape(
      "block_shape=(5, 5) does not divide params['d0']['kernel'] of shape (16, 32)")):
    tx.init(make_params())


def test_srigl_needs_a_neuron_axis():
  tx = sj.sparsify(optax.sgd(0.1), sj.srigl(0.5, end_step=10, key=jax.random.key(0)),
                   where="bias")
  with pytest.raises(ValueError, match=re.escape(
      "params['d0']['bias'] has shape (32,)")):
    tx.init(make_params())


def test_granet_reaches_final_sparsity_off_the_update_grid():
  method = sj.granet(0.9, end_step=10, update_every=4, drop_fraction=0.0,
                     distribution="uniform", key=jax.random.key(0))
  history = run(method, steps=14)
  for m in kernels(history[-1][1]):
    assert m.sum() == round(float(np.float32(1 - np.float32(0.9)) * m.size))


def test_srigl_keeps_its_budget_across_ablations():
  params = {"d0": {"kernel": normal(1, (3, 3, 8, 16)),
                   "bias": jnp.zeros(16)},
            "d1": {"kernel": normal(2, (72, 10))}}
  method = sj.srigl(0.9, end_step=9, update_every=2, drop_fraction=1.0, ablation_threshold=1.0,
                    key=jax.random.key(0))
  tx = sj.sparsify(optax.sgd(0.1), method)
  state = tx.init(params)
  budgets = [int(sj.get_masks(state)[k]["kernel"].sum()) for k in ("d0", "d1")]
  update = jax.jit(tx.update)
  for i in range(9):
    grads = jax.tree.map(lambda p: normal(i, p.shape), params)  # pylint: disable=cell-var-from-loop
    _, state = update(grads, state, params)
    for name, budget in zip(("d0", "d1"), budgets):
      mask = np.asarray(sj.get_masks(state)[name]["kernel"]).reshape(-1, 10 if name == "d1" else 16)
      alive = np.asarray(state.method_state.alive[name]["kernel"])
      rows = mask.shape[0]
      # Ablation stops while the budget still fits the living neurons.
      assert alive.sum() >= -(-budget // rows)
      assert np.all(mask.sum(0)[alive] == min(budget // alive.sum(), rows))


def test_global_distribution_needs_equal_units():
  scores = {"big": jnp.ones((100, 4)), "small": jnp.ones((2, 4))}
  with pytest.raises(ValueError, match="units differ .*big: 100 entries, small: 2 entries"):
    sj.masks_from_scores(scores, 0.5, distribution="global", granularity=sj.Channel(-1))
  masks = sj.masks_from_scores({"a": jnp.ones((4, 8)), "b": jnp.ones((8, 8))}, 0.5, distribution="global", granularity=sj.Block((2, 2)))  # tiles are equal everywhere
  assert sum(int(m.sum()) for m in masks.values()) == 48


def test_more_bad_input():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="init_sparsity=0.9 must be <= sparsity=0.5"):
    sj.granet(0.5, init_sparsity=0.9, end_step=10, key=key)
  with pytest.raises(ValueError, match="end_step=None must be an integer"):
    sj.rigl(0.9, end_step=None, key=key)
  with pytest.raises(ValueError, match="score_state must be a pair of callables"):
    sj.drop_and_grow(0.9, drop_score=sj.magnitude_score, grow_score=sj.gradient_score,
                     end_step=10, key=key, score_state=(lambda m: m,))
  with pytest.raises(ValueError, match="must be a tuple of integers"):
    sj.Block((True, 2))
  assert sj.Block((np.int64(4), 4)).block_shape == (4, 4)
  assert sj.Channel(np.int64(0)).axis == 0
