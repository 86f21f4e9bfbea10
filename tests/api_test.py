"""The one method API: schedules everywhere, one-shot safety, optax composition, clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

KEY = jax.random.key(0)


def make_params(key=0):
  k = jax.random.split(jax.random.key(key), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (16, 32)), "bias": jnp.zeros(32)},
          "b": {"kernel": jax.random.normal(k[1], (32, 8)) * 0.5}}


def loss_fn(params, x):
  h = jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"][None])
  return jnp.mean((h @ params["b"]["kernel"] - 1.0) ** 2)


def train(tx, params, steps, grads_fn=None, **extra):
  state = tx.init(params)
  params = sj.apply_masks(params, sj.get_masks(state))
  update = jax.jit(tx.update)
  for i in range(steps):
    x = jax.random.normal(jax.random.fold_in(KEY, i), (8, 16))
    grads = jax.grad(loss_fn)(params, x) if grads_fn is None else grads_fn(params, x, i)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def kept(masks):
  return [int(m.sum()) for m in jax.tree.leaves(masks)]


def exact(sparsity, sizes):
  return [int(np.round(np.float32(1 - np.float32(sparsity)) * np.float32(n))) for n in sizes]


SCHEDULE = sj.cubic_schedule(0.9, init_sparsity=0.5, end_step=10)

FOLLOWERS = {
    "rigl": lambda s: sj.rigl(s, end_step=100, update_every=1, distribution="uniform", key=KEY),
    "set": lambda s: sj.set_evolution(s, end_step=100, update_every=1, distribution="uniform",
                                      key=KEY),
    "drop_and_grow": lambda s: sj.drop_and_grow(
        s, drop_score=sj.magnitude_score, grow_score=sj.gradient_score, end_step=100,
        update_every=1, distribution="uniform", key=KEY),
    "granet": lambda s: sj.granet(s, end_step=100, update_every=1, distribution="uniform", key=KEY),
    "magnitude": lambda s: sj.magnitude(s, update_every=1, distribution="uniform"),
}


@pytest.mark.parametrize("name", sorted(FOLLOWERS))
def test_methods_follow_a_sparsity_schedule(name):
  sizes = [16 * 32, 32 * 8]
  tx = sj.sparsify(optax.adam(1e-2), FOLLOWERS[name](SCHEDULE))  # both runs share its compile
  params, state = train(tx, make_params(), steps=4)
  assert kept(sj.get_masks(state)) == exact(float(SCHEDULE(4)), sizes)
  params, state = train(tx, make_params(), steps=20)
  masks = sj.get_masks(state)
  assert kept(masks) == exact(0.9, sizes)
  for m, p in zip(jax.tree.leaves(masks), [params["a"]["kernel"], params["b"]["kernel"]]):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


def test_drop_and_grow_grows_when_the_schedule_falls():
  falling = optax.linear_schedule(0.9, 0.5, 6)
  _, state = train(sj.sparsify(optax.sgd(0.1), FOLLOWERS["rigl"](falling)), make_params(), 8)
  assert kept(sj.get_masks(state)) == exact(0.5, [16 * 32, 32 * 8])


def test_srigl_follows_a_schedule_with_constant_fan_in():
  method = sj.srigl(SCHEDULE, end_step=100, update_every=1, distribution="uniform",
                    ablation_threshold=0.0, key=KEY)
  _, state = train(sj.sparsify(optax.adam(1e-2), method), make_params(), 12)
  for m in jax.tree.leaves(sj.get_masks(state)):
    fan_in = int(np.round(np.float32(0.1) * np.float32(m.shape[0])))
    np.testing.assert_array_equal(np.asarray(m).sum(0), fan_in)


@pytest.mark.parametrize("make", [
    lambda s: sj.static_random(s, key=KEY),
    lambda s: sj.snip(s),
    lambda s: sj.init_masks(make_params(), s, key=KEY),
], ids=["static_random", "snip", "init_masks"])
def test_fixed_masks_refuse_schedules(make):
  with pytest.raises(ValueError, match="sparsity must be a float in \\[0, 1\\), not a schedule"):
    make(SCHEDULE)


@pytest.mark.parametrize("bad", [False, True, "0.5", None])
def test_sparsity_must_be_a_number(bad):
  with pytest.raises(ValueError, match=re.escape(f"sparsity={bad!r} must be a number")):
    sj.magnitude(bad)


@pytest.mark.parametrize("order", ["inner", "outer"])
def test_snip_waits_for_the_first_finite_step(order):
  def grads_fn(params, x, i):
    grads = jax.grad(loss_fn)(params, x)
    return jax.tree.map(lambda g: g * jnp.inf, grads) if i == 0 else grads  # fp16 overflow

  method = sj.snip(0.85)
  if order == "inner":
    tx = sj.sparsify(optax.apply_if_finite(optax.sgd(0.1), 3), method)
  else:
    tx = optax.apply_if_finite(sj.sparsify(optax.sgd(0.1), method), 3)
  _, state = train(tx, make_params(), 1, grads_fn)
  assert all(bool(m.all()) for m in jax.tree.leaves(sj.get_masks(state)))  # not committed
  params, state = train(tx, make_params(), 3, grads_fn)
  masks = sj.get_masks(state)
  assert sum(kept(masks)) == exact(0.85, [16 * 32 + 32 * 8])[0]
  assert int((params["b"]["kernel"] != 0).sum()) > 0  # the output layer kept weights
  assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))


def _labels(params):
  return {name: {leaf: name for leaf in layer} for name, layer in params.items()}


def test_partition_around_sparsify_leaves_other_branches_dense():
  tx = optax.partition({"a": sj.sparsify(optax.adam(1e-2), sj.magnitude(0.75, update_every=1)),
                        "b": optax.adam(1e-2)}, _labels)
  params, state = train(tx, make_params(), 3)
  masks = sj.get_masks(state)
  assert masks["b"]["kernel"] is None and masks["a"]["bias"] is None
  assert int(masks["a"]["kernel"].sum()) == 128
  chex_equal = jax.tree.map(np.testing.assert_array_equal, sj.apply_masks(params, masks), params)
  del chex_equal
  assert "a/kernel" in sj.summary(params, masks)
  assert np.all(np.asarray(sj.sparse_params(params, state)["a"]["kernel"])[
      ~np.asarray(masks["a"]["kernel"])] == 0)


def test_one_sparsify_per_partition_branch():
  tx = optax.partition({
      "a": sj.sparsify(optax.adam(1e-2), sj.magnitude(0.75, update_every=1)),
      "b": sj.sparsify(optax.sgd(0.1), sj.static_random(0.5, key=KEY))}, _labels)
  _, state = train(tx, make_params(), 2)
  masks = sj.get_masks(state)
  assert kept(masks) == [128, 128]


def test_masked_around_sparsify():
  tx = optax.masked(sj.sparsify(optax.adam(1e-2), sj.magnitude(0.75, update_every=1)),
                    lambda p: {"a": {"kernel": True, "bias": False}, "b": {"kernel": False}})
  params, state = train(tx, make_params(), 2)
  masks = sj.get_masks(state)
  assert masks["b"]["kernel"] is None and int(masks["a"]["kernel"].sum()) == 128
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0)


@pytest.mark.parametrize("make_inner", [
    lambda: optax.partition({"a": optax.adam(1e-2), "b": optax.sgd(0.1)}, _labels),
    lambda: optax.partition({"kernel": optax.adam(1e-2), "bias": optax.sgd(0.1)},
                            lambda p: {n: {k: k for k in layer} for n, layer in p.items()}),
], ids=["labels_fn", "labels_comprehension"])
def test_inner_partition_with_a_labels_function(make_inner):
  method = sj.rigl(0.75, end_step=10, update_every=2, key=KEY)
  params, state = train(sj.sparsify(make_inner(), method), make_params(), 5)
  masks, mu = sj.get_masks(state), optax.tree.get(state, "mu")  # the first adam branch
  checked = 0
  for layer in ("a", "b"):
    if isinstance(mu[layer], dict) and isinstance(mu[layer]["kernel"], jax.Array):
      assert np.all(np.asarray(mu[layer]["kernel"])[~np.asarray(masks[layer]["kernel"])] == 0)
      checked += 1
  assert checked


def test_inner_flax_path_aware_labels():
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  labels = lambda p: traverse_util.path_aware_map(
      lambda path, x: "kernel" if path[-1] == "kernel" else "bias", p)
  inner = optax.partition({"kernel": optax.adam(1e-2), "bias": optax.sgd(0.1)}, labels)
  params, state = train(sj.sparsify(inner, sj.magnitude(0.75, update_every=1)), make_params(), 3)
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(sj.get_masks(state)["a"]["kernel"])]
                == 0)


def test_inner_lbfgs():
  tx = sj.sparsify(optax.lbfgs(), sj.magnitude(0.75, update_every=2))
  params = make_params()
  state = tx.init(params)
  params = sj.apply_masks(params, sj.get_masks(state))
  x = jax.random.normal(KEY, (8, 16))
  value_fn = lambda p: loss_fn(p, x)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=value_fn)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(5):
    params, state, value = step(params, state)
    losses.append(float(value))
  masks = sj.get_masks(state)
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0)
  assert losses[-1] < losses[0]
  memory = optax.tree.get(state, "diff_params_memory")
  assert np.all(np.asarray(memory["a"]["kernel"])[:, ~np.asarray(masks["a"]["kernel"])] == 0)


def test_schedule_free_state_is_exactly_zero_at_pruned_entries():
  inner = optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2, weight_decay=0.1)
  tx = sj.sparsify(inner, sj.magnitude(sj.cubic_schedule(0.8, end_step=6), update_every=2))
  params = make_params()
  state = tx.init(params)
  params = sj.apply_masks(params, sj.get_masks(state))
  update = jax.jit(tx.update)
  pruned_steps = 0
  for i in range(8):
    grads = jax.grad(loss_fn)(params, jax.random.normal(jax.random.fold_in(KEY, i), (8, 16)))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    mask = ~np.asarray(sj.get_masks(state)["a"]["kernel"])
    pruned_steps += bool(mask.any())
    assert np.all(np.asarray(optax.tree.get(state, "z")["a"]["kernel"])[mask] == 0), i
    evaluated = optax.contrib.schedule_free_eval_params(optax.tree.get(state, "ScheduleFreeState"),
                                                        params)
    assert np.all(np.asarray(evaluated["a"]["kernel"])[mask] == 0), i
  assert pruned_steps >= 6


def test_step_arguments_are_injectable():
  make = lambda end_step: sj.sparsify(
      optax.adam(1e-2), sj.rigl(0.75, end_step=end_step, update_every=1, distribution="uniform",
                                key=KEY))
  tx = optax.inject_hyperparams(make)(end_step=3)
  _, state = train(tx, make_params(), 6)
  assert kept(sj.get_masks(state)) == exact(0.75, [16 * 32, 32 * 8])
  frozen = optax.inject_hyperparams(make, static_args=("end_step",))(end_step=3)
  train(frozen, make_params(), 2)


def test_static_arguments_say_so_under_inject_hyperparams():
  tx = optax.inject_hyperparams(lambda m: sj.sparsify(optax.sgd(0.1), sj.n_m(2, m)))(m=4)
  with pytest.raises(ValueError, match=re.escape("static_args=('m',)")):
    tx.init(make_params())


def test_none_gradient_at_a_sparsified_leaf():
  tx = sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5))
  params = make_params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["a"]["kernel"] = None
  with pytest.raises(ValueError, match=re.escape(
      "updates['a']['kernel'] is None but the leaf is sparsified: expected an array of shape "
      "(16, 32)")):
    tx.update(grads, state, params)


def test_custom_init_with_a_mask_at_a_dense_leaf():
  method = sj.SparsityMethod(
      init=lambda p: (jax.tree.map(lambda x: jnp.ones(x.shape, bool), p), None),
      update=lambda m, s, p, g, t: (m, s), should_update=lambda t: False)
  tx = sj.sparsify(optax.sgd(0.1), method, where="kernel")
  tx.init(make_params())  # the method sees only the selected leaves
  bad = sj.SparsityMethod(
      init=lambda p: ({"a": {"kernel": jnp.ones((16, 32), bool), "bias": jnp.ones(32, bool)},
                       "b": {"kernel": jnp.ones((32, 8), bool)}}, None),
      update=method.update, should_update=method.should_update)
  with pytest.raises(ValueError, match=re.escape(
      "returned a mask at masks['a']['bias'], a dense leaf (not selected by `where`): expected "
      "None there")):
    sj.sparsify(optax.sgd(0.1), bad, where="kernel").init(make_params())


def test_where_given_an_nnx_filter():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  tx = sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5), where=nnx.Param)
  with pytest.raises(ValueError, match=re.escape("pass where=sj.nnx_filter(Param) instead")):
    tx.init(make_params())
  tx = sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5), where=nnx.PathContains("kernel"))
  with pytest.raises(ValueError, match="sj.nnx_filter"):
    tx.init(make_params())


def test_scalar_leaf_cannot_be_selected():
  params = {"w": jnp.ones((4, 4)), "scale": jnp.float32(2.0)}
  with pytest.raises(ValueError, match=re.escape("where selected params['scale'], a scalar")):
    sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5), where=lambda p, x: True).init(params)


def test_granularity_where_it_does_not_apply():
  with pytest.raises(ValueError, match="srigl: granularity=.*constant fan-in"):
    sj.srigl(0.5, end_step=10, key=KEY, granularity=sj.Block((4, 4)))
  with pytest.raises(ValueError, match="n_m: granularity=.*the N:M group"):
    sj.n_m(2, 4, granularity=sj.Channel(-1))


def test_topk_method_is_an_argument():
  scores = jax.random.normal(KEY, (50, 40))
  # Jitted with a traced k: one compile per method (eager, every call compiles the search).
  search, sort = (jax.jit(lambda s, k, method=method: sj.topk_mask(s, k, method=method))
                  for method in ("search", "sort"))
  for k in (0, 1, 999, 2000):
    np.testing.assert_array_equal(search(scores, k), sort(scores, k))
  with pytest.raises(ValueError, match="method='heap' must be one of"):
    sj.topk_mask(scores, 3, method="heap")


def test_import_does_not_import_flax():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, sparsejax, sparsejax.attention, sparsejax.matmul; "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'flax'], 'flax imported'; "
          "import sparsejax.nn; assert 'flax.nnx' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_multisteps_around_sparsify():
  tx = optax.MultiSteps(sj.sparsify(optax.adam(1e-2), sj.magnitude(
      0.75, update_every=1, distribution="uniform")), 2)
  params, state = train(tx, make_params(), 5)
  masks = sj.get_masks(state)
  assert kept(masks)[0] == 128
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0)


def test_forward_mode_through_masked_weight_is_documented():
  assert "Reverse mode only" in sj.masked_weight.__doc__
  w, mask = jnp.ones(4), jnp.array([True, False, True, False])
  assert jax.jvp(lambda w: sj.apply_masks({"w": w}, {"w": mask})["w"], (w,), (w,))[1][1] == 0
