"""Robustness sweep: every public function meets its plausible bad inputs.

A bad input must raise a ValueError (or Python's own TypeError for a wrong
keyword) whose message names the argument or the leaf path and says what
was expected. Inputs the library accepts on purpose (raw uint32 keys, a
clipped `k`, empty trees where they make sense) are asserted too, so a change
of behaviour shows up here. The second half checks that NaN gradients never
corrupt the masks, and hypothesis properties over random small pytrees.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import sparsejax as sj
from sparsejax import attention as sja
from sparsejax import matmul as sjm
from contract_test import METHODS, assert_exact, batches, checked, forward_params, is_dense
from contract_test import loss_fn, make_params

KEY = jax.random.key(0)
NO_PARAMS = "sparsify needs the current params: call tx.update(grads, state, params)"


def raises(match, fn, *args, **kwargs):
  """`fn(*args, **kwargs)` raises a ValueError whose message contains `match` literally."""
  with pytest.raises(ValueError, match=re.escape(match)):
    fn(*args, **kwargs)


def grads_like(params, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


# ------------------------------------------------------------------ sparsify


@pytest.fixture(scope="module")
def magnitude_tx():
  tx = sj.sparsify(optax.adam(1e-2), sj.magnitude(0.5, update_every=2))
  params = make_params()
  return tx, params, jax.jit(tx.init)(params)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_update_without_params_raises_the_shared_message(name):
  tx = sj.sparsify(optax.adam(1e-2), METHODS[name].make())
  params = make_params()
  state = jax.eval_shape(tx.init, params)  # the check comes before the state is read
  grads = grads_like(params)
  raises(NO_PARAMS, tx.update, grads, state)
  raises(NO_PARAMS, tx.update, grads, state, None)


def test_update_without_params_under_jit(magnitude_tx):
  tx, params, state = magnitude_tx
  raises(NO_PARAMS, jax.jit(tx.update), grads_like(params), state)


def test_update_with_mismatched_params_or_grads_names_the_leaf(magnitude_tx):
  tx, params, state = magnitude_tx
  grads = grads_like(params)
  missing = {k: v for k, v in params.items() if k != "out"}
  raises("leaves in masks but not in params: ['out/bias', 'out/kernel']",
         tx.update, grads, state, missing)
  transposed = {**params, "dense1": {**params["dense1"], "kernel": jnp.ones((16, 24))}}
  raises("params['dense1']['kernel']: mask shape (24, 16) != param shape (16, 24)",
         tx.update, grads, state, transposed)
  raises("updates['dense1']['kernel']: mask shape (24, 16) != param shape (16, 24)",
         tx.update, transposed, state, params)
  raises("leaves missing from masks: ['extra']", tx.update, {**grads, "extra": jnp.ones(3)},
         state, params)
  raises("params['dense1']['kernel']: mask shape (24, 16) != param shape (16, 24)",
         jax.jit(tx.update), grads, state, transposed)


def test_sparsify_rejects_what_is_not_an_optimizer_or_a_method():
  raises("inner must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got 0.1",
         sj.sparsify, 0.1, sj.magnitude(0.5))
  raises("inner must be an optax.GradientTransformation", sj.sparsify, None, sj.magnitude(0.5))
  raises("method must be a sj.SparsityMethod (e.g. sj.magnitude(0.9)), got float",
         sj.sparsify, optax.adam(1e-2), 0.5)
  raises("method must be a sj.SparsityMethod (e.g. sj.magnitude(0.9)), got function",
         sj.sparsify, optax.adam(1e-2), sj.magnitude)  # the factory, not called


@pytest.mark.parametrize("where, params, message", [
    ("nothing", None, "where matches no leaf of params, so nothing would be sparsified. "
                      "Leaf paths: dense0/bias, dense0/kernel"),
    ("(", None, "where: '(' is not a valid regular expression"),
    (3, None, "where must be None, a callable (path, leaf) -> bool, a path pattern"),
    (["kernel", 3], None, "path_pattern takes one or more regex strings, got ('kernel', 3)"),
    ([], None, "path_pattern takes one or more regex strings, got ()"),
    ("step", {"step": jnp.ones((4, 4), jnp.int32), "w": jnp.ones((4, 4))},
     "where selected params['step'] of dtype int32; only floating-point leaves"),
    (lambda path, leaf: jnp.ones(3), None,
     "where must return a bool for each leaf; for params['dense0']['bias'] it failed"),
    ("s", {"s": jnp.ones(()), "w": jnp.ones((4, 4))},
     "where selected params['s'], a scalar: a 0-d leaf has nothing to prune"),
    (nnx.Param, None, "is a flax nnx filter, which sees nnx paths and Variables: pass "
                      "where=sj.nnx_filter(Param) instead"),
    (nnx.PathContains("kernel"), None, "pass where=sj.nnx_filter(filter) instead"),
])
def test_bad_where(where, params, message):
  tx = sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5), where=where)
  raises(message, tx.init, make_params() if params is None else params)


def test_get_masks_needs_one_sparsify_state_per_leaf(magnitude_tx):
  _, params, state = magnitude_tx
  raises("the optimizer state holds no SparsifyState: it must come from an optimizer built with "
         "sj.sparsify", sj.get_masks, optax.adam(1e-2).init(params))
  raises("['dense0']['kernel'] is sparsified by 2 sparsify transformations; each leaf may be "
         "sparsified by one only",
         sj.get_masks, (state, state))
  raises("leaves in masks but not in params: ['out/bias', 'out/kernel']",
         sj.sparse_params, {k: v for k, v in params.items() if k != "out"}, state)


# ------------------------------------------------------------- empty pytrees


def test_empty_and_degenerate_pytrees():
  tx = sj.sparsify(optax.adam(1e-2), sj.magnitude(0.5))
  raises("params has no leaves: there is nothing to sparsify.", tx.init, {})
  raises("where matches no leaf of params", tx.init, {"bias": jnp.zeros(3)})
  raises("where matches no leaf of params", tx.init, {"w": jnp.ones((4, 4), jnp.int32)})
  raises("params has no leaves", sj.init_masks, {}, 0.5, key=KEY)
  raises("scores has no array leaves: there is nothing to mask.", sj.masks_from_scores, {}, 0.5)
  raises("scores has no array leaves", sj.masks_from_scores, {"a": None}, 0.5)
  # Pure functions over an empty tree just return it.
  assert sj.apply_masks({}, {}) == {}
  assert "total (all leaves)" in sj.summary({})
  assert sj.ERK().densities([], 0.5) == []
  # A zero-size leaf next to a real one is sparsified with nothing to keep.
  params = {"empty": jnp.ones((0, 4)), "w": jnp.ones((4, 4))}
  masks = sj.get_masks(jax.jit(tx.init)(params))
  assert masks["empty"].shape == (0, 4) and masks["empty"].dtype == jnp.bool_
  assert int(masks["w"].sum()) == 8


# ---------------------------------------------------------- method factories

FACTORIES = {
    "static_random": lambda **kw: sj.static_random(
        kw.pop("sparsity", 0.5), key=kw.pop("key", KEY), **kw),
    "magnitude": lambda **kw: sj.magnitude(kw.pop("sparsity", 0.5), **kw),
    "snip": lambda **kw: sj.snip(kw.pop("sparsity", 0.5), **kw),
    "set_evolution": lambda **kw: sj.set_evolution(
        kw.pop("sparsity", 0.5), end_step=kw.pop("end_step", 10), key=kw.pop("key", KEY), **kw),
    "rigl": lambda **kw: sj.rigl(
        kw.pop("sparsity", 0.5), end_step=kw.pop("end_step", 10), key=kw.pop("key", KEY), **kw),
    "granet": lambda **kw: sj.granet(
        kw.pop("sparsity", 0.5), end_step=kw.pop("end_step", 10), key=kw.pop("key", KEY), **kw),
    "srigl": lambda **kw: sj.srigl(
        kw.pop("sparsity", 0.5), end_step=kw.pop("end_step", 10), key=kw.pop("key", KEY), **kw),
    "drop_and_grow": lambda **kw: sj.drop_and_grow(
        kw.pop("sparsity", 0.5), drop_score=sj.magnitude_score, grow_score=sj.gradient_score,
        end_step=kw.pop("end_step", 10), key=kw.pop("key", KEY), **kw),
}
SPARSITY_METHODS = sorted(FACTORIES)
STEPPED = ["set_evolution", "rigl", "granet", "srigl", "drop_and_grow"]
KEYED = ["static_random", "set_evolution", "rigl", "granet", "srigl", "drop_and_grow"]


@pytest.mark.parametrize("sparsity, message", [
    (-0.1, "sparsity=-0.1 must lie in [0, 1)"),
    (1.0, "sparsity=1.0 must lie in [0, 1)"),
    (1.5, "sparsity=1.5 must lie in [0, 1)"),
    (float("nan"), "sparsity=nan must lie in [0, 1)"),
    # Methods that take a schedule go on "or a schedule step -> value" (granet does not).
    (None, "sparsity=None must be a number"),
    (False, "sparsity=False must be a number"),
    ("0.5", "sparsity='0.5' must be a number"),
    (jnp.array([0.5, 0.5]), "sparsity must be a scalar, got shape (2,)"),
])
@pytest.mark.parametrize("method", SPARSITY_METHODS)
def test_sparsity_out_of_range(method, sparsity, message):
  raises(message, FACTORIES[method], sparsity=sparsity)


@pytest.mark.parametrize("method", SPARSITY_METHODS)
def test_only_sparsity_is_positional(method):
  if method == "static_random":
    call = lambda: sj.static_random(0.5, "uniform", key=KEY)
  elif method in ("magnitude", "snip"):
    call = lambda: getattr(sj, method)(0.5, "uniform")
  else:
    call = lambda: getattr(sj, method)(0.5, KEY, 10)
  with pytest.raises(TypeError, match="takes 1 positional argument"):
    call()


@pytest.mark.parametrize("update_every", [0, -1, 1.5, True, None])
@pytest.mark.parametrize("method", ["magnitude", *STEPPED])
def test_bad_update_every(method, update_every):
  raises(f"update_every={update_every!r} must be an integer >= 1", FACTORIES[method],
         update_every=update_every)


@pytest.mark.parametrize("method", STEPPED)
def test_bad_steps(method):
  raises("end_step=5 must be >= begin_step=10", FACTORIES[method], begin_step=10, end_step=5)
  raises("end_step=-1 must be an integer >= 0", FACTORIES[method], end_step=-1)
  raises("begin_step=-2 must be an integer >= 0", FACTORIES[method], begin_step=-2)
  raises("end_step=2.5 must be an integer >= 0", FACTORIES[method], end_step=2.5)
  raises("drop_fraction=1.5 must lie in [0, 1]", FACTORIES[method], drop_fraction=1.5)


@pytest.mark.parametrize("key, message", [
    (0, "key must be a JAX PRNG key such as jax.random.key(0), got 0"),
    (None, "key must be a JAX PRNG key such as jax.random.key(0), got None"),
    (jnp.zeros(2), "key must be a JAX PRNG key such as jax.random.key(0), got Array([0., 0.]"),
    (np.array([0, 1], np.uint32), "key must be a JAX PRNG key"),  # host data, not a jax key
    (jax.random.split(KEY, 3), "key must be a single PRNG key such as jax.random.key(0), got an "
                               "array of keys of shape (3,)"),
    (jax.random.split(jax.random.PRNGKey(0), 3), "key must be a JAX PRNG key"),
])
@pytest.mark.parametrize("method", KEYED)
def test_bad_keys(method, key, message):
  raises(message, FACTORIES[method], key=key)


def test_bad_init_masks_key():
  raises("key must be a JAX PRNG key such as jax.random.key(0), got 0",
         sj.init_masks, make_params(), 0.5, key=0)
  raises("key must be a single PRNG key", sj.init_masks, make_params(), 0.5,
         key=jax.random.split(KEY, 2))


def test_raw_uint32_keys_are_accepted_and_match_typed_keys():
  """Documented: a key is a typed key or a raw uint32[2] one; both draw the same masks."""
  raw = jax.random.PRNGKey(3)
  params = make_params()
  typed = jax.random.wrap_key_data(raw)
  chex.assert_trees_all_equal(sj.init_masks(params, 0.7, key=raw),
                              sj.init_masks(params, 0.7, key=typed))
  for method in KEYED:
    tx = sj.sparsify(optax.sgd(0.1), FACTORIES[method](key=raw, distribution="uniform"))
    masks = sj.get_masks(jax.eval_shape(tx.init, params))
    assert jax.tree.leaves(masks)[0].dtype == jnp.bool_


@pytest.mark.parametrize("method", SPARSITY_METHODS)
def test_bad_distribution_and_granularity(method):
  raises("unknown distribution 'erkk'; expected one of ['erk', 'global', 'uniform']",
         FACTORIES[method], distribution="erkk")
  raises("unknown distribution 3", FACTORIES[method], distribution=3)
  if method == "srigl":  # srigl is structured already and takes granularity=None only
    raises("srigl: granularity=(2, 2) is not supported: SRigL's unit is already structured",
           FACTORIES[method], granularity=(2, 2))
  else:
    raises("granularity must be None, sj.Block(block_shape) or sj.Channel(axis), got (2, 2)",
           FACTORIES[method], granularity=(2, 2))


def test_method_specific_arguments():
  raises("init_sparsity=0.8 must be <= sparsity=0.5: GraNet only prunes",
         FACTORIES["granet"], init_sparsity=0.8)
  raises("init_sparsity=1.0 must lie in [0, 1)", FACTORIES["granet"], init_sparsity=1.0)
  raises("srigl needs a per-leaf density: use distribution='erk' or 'uniform'",
         FACTORIES["srigl"], distribution="global")
  raises("ablation_threshold=1.5 must lie in [0, 1]", FACTORIES["srigl"], ablation_threshold=1.5)
  raises("srigl: granularity=Block(block_shape=(2, 2), reduce='mean') is not supported",
         FACTORIES["srigl"], granularity=sj.Block((2, 2)))
  raises("drop_score and grow_score must be callables", sj.drop_and_grow, 0.5, drop_score=1,
         grow_score=sj.gradient_score, end_step=10, key=KEY)
  raises("score_state must be a pair of callables (init, update), got (1, 2)", FACTORIES[
      "drop_and_grow"], score_state=(1, 2))
  srigl = sj.sparsify(optax.sgd(0.1), sj.srigl(0.5, end_step=4, key=KEY), where=".")
  raises("srigl needs leaves with a fan-in and a neuron axis; params['dense0']['bias'] has "
         "shape (24,)", srigl.init, make_params())


@pytest.mark.parametrize("owner, make", [
    ("static_random", lambda sparsity: sj.static_random(sparsity, key=KEY)),
    ("snip", lambda sparsity: sj.snip(sparsity)),
    ("init_masks", lambda sparsity: sj.init_masks(make_params(), sparsity, key=KEY)),
])
def test_fixed_masks_reject_a_schedule(owner, make):
  raises(f"{owner}: sparsity must be a float in [0, 1), not a schedule", make,
         sj.cubic_schedule(0.5, end_step=10))


def test_update_window_edges():
  """Masks change at update steps t > 0 in [begin_step, end_step], and at end_step (inclusive)."""
  params = make_params()
  grads = grads_like(params)

  def masks_per_step(method, n_steps=7):
    tx = sj.sparsify(optax.sgd(0.1), method)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    history = [sj.get_masks(state)]  # the masks of steps 0, 1, ...
    for _ in range(n_steps):
      _, state = update(grads, state, params)
      history.append(sj.get_masks(state))
    return history

  def changes(method):
    history = masks_per_step(method)
    return [t for t in range(1, len(history))
            if int(sj.mask_flips(history[t - 1], history[t])) > 0]

  rigl = lambda **kw: sj.rigl(0.8, drop_fraction=0.5, key=KEY, **kw)
  assert changes(rigl(begin_step=3, end_step=3, update_every=1)) == [3]
  assert changes(rigl(begin_step=0, end_step=5, update_every=2)) == [2, 4, 5]
  assert changes(rigl(begin_step=1, end_step=6, update_every=3)) == [1, 4, 6]
  # GraNet with end_step=0 starts at its final sparsity (step 0, from init) and never updates.
  history = masks_per_step(sj.granet(0.9, end_step=0, distribution="uniform", key=KEY), 3)
  assert int(history[0]["dense1"]["kernel"].sum()) == round(0.1 * 24 * 16)
  for masks in history[1:]:
    chex.assert_trees_all_equal(masks, history[0])


# ------------------------------------------------------------------ N:M


@pytest.mark.parametrize("n, m, message", [
    (3, 2, "n=3 must be an integer with 0 <= n <= m=2"),
    (-1, 4, "n=-1 must be an integer with 0 <= n <= m=4"),
    (2.5, 4, "n=2.5 must be an integer with 0 <= n <= m=4"),
    ("2", 4, "n='2' must be an integer with 0 <= n <= m=4"),
    (None, 4, "n=None must be an integer with 0 <= n <= m=4"),
    (2, 0, "m=0 must be an integer >= 1"),
    (2, -4, "m=-4 must be an integer >= 1"),
    (2, 4.0, "m=4.0 must be an integer >= 1"),
])
def test_bad_n_m(n, m, message):
  raises(message, sj.n_m, n, m)
  raises(message, sj.n_m_mask, jnp.ones((8, 8)), n, m)
  raises(message, sjm.compress_n_m, jnp.ones((8, 8)), n, m)
  raises(message, sj.transposable_n_m_mask, jnp.ones((8, 8)), n, m)


def test_n_m_axes_and_leaves():
  raises("axis='x' must be an integer", sj.n_m, 2, 4, axis="x")
  raises("axis=1.0 must be an integer", sj.n_m, 2, 4, axis=1.0)
  raises("axis=1.0 must be an integer", sj.n_m_mask, jnp.ones((8, 8)), 2, 4, axis=1.0)
  with pytest.raises(TypeError, match="positional"):  # axis is keyword-only
    sj.n_m_mask(jnp.ones((8, 8)), 2, 4, 0)
  # The default axis is -2 (the inputs of an (in, out) kernel), in n_m_mask and n_m alike.
  raises("m=4 does not divide axis 0 (length 6) of scores of shape (6, 8)",
         sj.n_m_mask, jnp.ones((6, 8)), 2, 4)
  raises("axis=3 is out of range for scores of shape (8, 8)", sj.n_m_mask, jnp.ones((8, 8)), 2, 4,
         axis=3)
  raises("axis=-2 is out of range for scores of shape (8,)", sj.n_m_mask, jnp.ones(8), 2, 4)
  raises("axis=-2 is out of range for scores of shape ()", sj.n_m_mask, jnp.ones(()), 2, 4)
  tx = sj.sparsify(optax.sgd(0.1), sj.n_m(2, 4))
  raises("m=4 does not divide axis 0 (length 6) of params['dense0']['kernel'] of shape (6, 8)",
         tx.init, {"dense0": {"kernel": jnp.ones((6, 8))}})
  tx = sj.sparsify(optax.sgd(0.1), sj.n_m(2, 4, axis=5))
  raises("axis=5 is out of range for params['w'] of shape (8, 8)", tx.init, {"w": jnp.ones((8, 8))})


def test_transposable_n_m_limits():
  # m = 6 used to enumerate tens of millions of patterns in Python (a hang).
  raises("transposable 3:6 masks are searched exactly over all patterns, which supports m <= 5",
         sj.transposable_n_m_mask, jnp.ones((12, 12)), 3, 6)
  raises("supports m <= 5; got m=8", sj.n_m, 2, 8, transposable=True)
  raises("transposable 2:4 needs the last two dims of (6, 8) to be multiples of m=4",
         sj.transposable_n_m_mask, jnp.ones((6, 8)), 2, 4)
  raises("transposable masks need a fixed integer n, not a schedule", sj.n_m, sj.piecewise({0: 2}),
         4, transposable=True)


def test_n_m_mask_accepts_array_likes_and_validates_n():
  np.testing.assert_array_equal(sj.n_m_mask([[1.0], [4.0], [3.0], [2.0]], 2, 4),
                                [[False], [True], [True], [False]])
  np.testing.assert_array_equal(sj.n_m_mask([[1.0, 4.0, 3.0, 2.0]], 2, 4, axis=-1),
                                [[False, True, True, False]])
  raises("piecewise needs a dict {step: value} with a value from step 0, got {}", sj.piecewise, {})
  raises("piecewise needs a dict {step: value} with a value from step 0, got {5: 2}",
         sj.piecewise, {5: 2})
  raises("piecewise needs a dict {step: value} with a value from step 0, got [(0, 2)]",
         sj.piecewise, [(0, 2)])
  raises("estimator='magic' must be one of ('hard', 'ste', 'sr_ste', 'decay')", sj.n_m, 2, 4,
         estimator="magic")
  raises("n_m: granularity=", sj.n_m, 2, 4, granularity=sj.Block((2, 2)))


# ------------------------------------------------- distributions, granularity


@pytest.mark.parametrize("make, message", [
    (lambda: sj.Uniform(overrides=[("a", 0.5)]), "overrides must map path patterns to sparsities"),
    (lambda: sj.Uniform(overrides={"a": 1.5}), "overrides['a']=1.5 must lie in [0, 1)"),
    (lambda: sj.ERK(overrides={"a": None}), "overrides['a']=None must be a number or a schedule"),
    (lambda: sj.Global(overrides={"(": 0.5}), "overrides: '(' is not a valid regular expression"),
    (lambda: sj.Uniform(overrides={3: 0.5}), "override key 3 must be a path pattern string"),
    (lambda: sj.ERK(power_scale=-1.0), "power_scale=-1.0 must be a finite number >= 0"),
    (lambda: sj.ERK(power_scale=float("nan")), "power_scale=nan must be a finite number >= 0"),
    (lambda: sj.ERK(power_scale=float("inf")), "power_scale=inf must be a finite number >= 0"),
    (lambda: sj.ERK(power_scale="1"), "power_scale must be a Python float (it shapes the "
                                      "computation), got '1'"),
    (lambda: sj.Global(min_density=1.5), "min_density=1.5 must lie in [0, 1]"),
    (lambda: sj.Global(min_density=-0.1), "min_density=-0.1 must lie in [0, 1]"),
    (lambda: sj.Global(min_density=None), "min_density must be a Python float"),
    (lambda: sj.masks_from_scores({"a": jnp.ones((4, 4))}, 0.5,
                                  distribution=sj.Uniform(overrides={"zz": 0.5})),
     "overrides pattern 'zz' matches no sparsified leaf; sparsified leaves: ['a']"),
])
def test_bad_distributions(make, message):
  raises(message, make)


@pytest.mark.parametrize("block_shape", [(0, 2), (-1, 2), (2.0, 2), (), "ab", 4, None, (True, 2)])
def test_bad_block_shape(block_shape):
  raises(f"block_shape={block_shape!r} must be a tuple of integers >= 1", sj.Block, block_shape)


def test_bad_granularity():
  raises("reduce='sum' must be one of ('mean', 'max')", sj.Block, (2, 2), reduce="sum")
  raises("axis=1.0 must be an integer", sj.Channel, axis=1.0)
  raises("axis='x' must be an integer", sj.Channel, axis="x")
  raises("reduce='min' must be one of ('mean', 'max')", sj.Channel, reduce="min")
  params = make_params()
  tx = sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5, granularity=sj.Block((3, 3))))
  raises("block_shape=(3, 3) does not divide params['dense0']['kernel'] of shape (8, 24)",
         tx.init, params)
  raises("params['dense0']['kernel'] of shape (8, 24) has fewer dims than block_shape=(1, 4, 4)",
         sj.init_masks, params, 0.5, key=KEY, granularity=sj.Block((1, 4, 4)))
  raises("axis=2 is out of range for params['dense0']['kernel'] of shape (8, 24)",
         sj.init_masks, params, 0.5, key=KEY, granularity=sj.Channel(axis=2))
  raises("the Global distribution ranks units against each other, so they must be of one size",
         sj.masks_from_scores, {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 8))}, 0.5,
         distribution="global", granularity=sj.Channel())


def test_bad_block_layout_export():
  block_layout = sjm.block_layout
  raises("block_shape=(4, 4) does not divide the mask of shape (4, 6)",
         block_layout, jnp.ones((4, 6), bool), (4, 4))
  raises("mask is not block-structured for block_shape=(2, 2): some tiles are partly on",
         block_layout, jnp.eye(4, dtype=bool), (2, 2))
  raises("block_shape=(0, 2) must be a tuple of integers >= 1", block_layout,
         jnp.ones((4, 4), bool), (0, 2))
  raises("block_shape=(2.5, 2) must be a tuple of integers >= 1", block_layout,
         jnp.ones((4, 4), bool), (2.5, 2))
  raises("mask dtype float32 must be bool", block_layout, jnp.ones((4, 4)), (2, 2))


# ------------------------------------------------------------------- top-k


def test_bad_topk():
  raises("k=1.5 must be an integer", sj.topk_mask, jnp.arange(4.0), 1.5)
  raises("k='2' must be an integer scalar", sj.topk_mask, jnp.arange(4.0), "2")
  raises("must be an integer scalar", sj.topk_mask, jnp.arange(4.0), jnp.array([1, 2]))
  raises("scores must be real, got complex64", sj.topk_mask, jnp.ones(4, jnp.complex64), 2)
  raises("method='heap' must be one of", sj.topk_mask, jnp.arange(4.0), 2, method="heap")
  raises("sparsity=1.0 must lie in [0, 1)", sj.masks_from_scores, {"a": jnp.ones(4)}, 1.0)
  raises("sparsity=-1.0 must lie in [0, 1)", sj.masks_from_scores, {"a": jnp.ones(4)}, -1.0)
  raises("scores['a']: scores must be floating, got int32", sj.masks_from_scores,
         {"a": jnp.ones(4, jnp.int32)}, 0.5)
  raises("scores['a']: scores must be float arrays, got 'x'", sj.masks_from_scores, {"a": "x"},
         0.5)
  raises("unknown distribution 'x'", sj.masks_from_scores, {"a": jnp.ones(4)}, 0.5,
         distribution="x")


def test_topk_documented_leniency():
  """`k` is clipped to [0, size] (documented); integral floats and array-likes are fine."""
  scores = jnp.array([0.3, -1.0, 2.0, 0.3])
  assert not bool(sj.topk_mask(scores, -1).any())
  assert bool(sj.topk_mask(scores, 10).all())
  np.testing.assert_array_equal(sj.topk_mask(scores, 2.0), [True, False, True, False])
  np.testing.assert_array_equal(sj.topk_mask([0.3, -1.0, 2.0, 0.3], 2),
                                [True, False, True, False])
  np.testing.assert_array_equal(jax.jit(sj.topk_mask)(scores, jnp.int32(1)),
                                [False, False, True, False])


# ------------------------------------------------------ apply_masks / init_masks


def test_apply_masks_mismatches_name_the_leaf(magnitude_tx):
  _, params, state = magnitude_tx
  masks = sj.get_masks(state)
  k = masks["dense1"]["kernel"]
  with_leaf = lambda x: {**masks, "dense1": {**masks["dense1"], "kernel": x}}
  raises("params['dense1']['kernel']: mask shape (16, 24) != param shape (24, 16)",
         sj.apply_masks, params, with_leaf(k.T))
  raises("params['dense1']['kernel']: mask dtype float32 != bool",
         sj.apply_masks, params, with_leaf(k.astype(jnp.float32)))
  raises("params['dense1']['kernel']: mask dtype int32 != bool",
         sj.apply_masks, params, with_leaf(k.astype(jnp.int32)))
  raises("leaves in masks but not in params: ['out/bias', 'out/kernel']",
         sj.apply_masks, {k_: v for k_, v in params.items() if k_ != "out"}, masks)
  raises("leaves missing from masks: ['dense0/bias', 'dense0/kernel'",
         sj.apply_masks, params, None)
  raises("params['dense1']['kernel']: mask shape (16, 24) != param shape (24, 16)",
         jax.jit(sj.apply_masks), params, with_leaf(k.T))
  raises("leaves missing from masks: ['dense1/kernel']",
         sj.summary, params, {**masks, "dense1": {"bias": None}})
  # Host bool masks are fine.
  chex.assert_trees_all_equal(sj.apply_masks(params, with_leaf(np.asarray(k))),
                              sj.apply_masks(params, masks))


def test_bad_init_masks():
  params = make_params()
  with pytest.raises(TypeError, match="positional"):  # distribution is keyword-only
    sj.init_masks(params, 0.5, "uniform", key=KEY)
  with pytest.raises(TypeError, match="positional"):
    sj.masks_from_scores({"a": jnp.ones(4)}, 0.5, "uniform")
  raises("sparsity=1.5 must lie in [0, 1)", sj.init_masks, params, 1.5, key=KEY)
  raises("unknown distribution 'x'", sj.init_masks, params, 0.5, key=KEY, distribution="x")
  raises("where matches no leaf of params", sj.init_masks, params, 0.5, key=KEY, where="zzz")


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_sparsity=1.5), "init_sparsity=1.5 must lie in [0, 1)"),
    (dict(sparsity=-1), "sparsity=-1.0 must lie in [0, 1)"),
    (dict(sparsity=None), "sparsity=None must be a number"),
    (dict(sparsity=lambda step: 0.5), "must be a number"),  # the ramp is the schedule
    (dict(begin_step=10, end_step=5), "end_step=5 must be >= begin_step=10"),
    (dict(begin_step=-1), "begin_step=-1 must be an integer >= 0"),
    (dict(begin_step=1.5), "begin_step=1.5 must be an integer >= 0"),
    (dict(end_step=None), "end_step=None must be an integer >= 0"),
    (dict(power=0), "power=0 must be a finite number > 0"),
    (dict(power=-1), "power=-1 must be a finite number > 0"),
    (dict(power=float("nan")), "power=nan must be a finite number > 0"),
    (dict(power=float("inf")), "power=inf must be a finite number > 0"),
    (dict(power="3"), "power='3' must be a finite number > 0"),
    (dict(power=None), "power=None must be a finite number > 0"),
])
def test_bad_cubic_schedule(kwargs, message):
  args = dict(sparsity=0.9, init_sparsity=0.0, begin_step=0, end_step=10) | kwargs
  raises(message, sj.cubic_schedule, args.pop("sparsity"), **args)


def test_cubic_schedule_arguments_are_keyword_only():
  with pytest.raises(TypeError, match="positional"):
    sj.cubic_schedule(0.9, 10)
  with pytest.raises(TypeError, match="positional"):
    sj.one_shot(0.9, 10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(update_every=0), "update_every=0 must be an integer >= 1"),
    (dict(update_every=1.5), "update_every=1.5 must be an integer >= 1"),
    (dict(update_every=2, begin_step=-1), "begin_step=-1 must be an integer >= 0"),
    (dict(update_every=2, end_step=-1), "end_step=-1 must be an integer >= 0"),
    (dict(update_every=2, begin_step=5, end_step=3), "end_step=3 must be >= begin_step=5"),
])
def test_bad_update_steps(kwargs, message):
  raises(message, sj.update_steps, **kwargs)


def test_bad_one_shot_and_edge_schedules():
  raises("sparsity=1.0 must lie in [0, 1)", sj.one_shot, 1.0)
  raises("step=-1 must be an integer >= 0", sj.one_shot, 0.5, step=-1)
  raises("step=1.5 must be an integer >= 0", sj.one_shot, 0.5, step=1.5)
  # begin == end is a step; a decreasing schedule is allowed (magnitude may regrow).
  assert float(sj.cubic_schedule(0.5, begin_step=7, end_step=7)(7)) == pytest.approx(0.5)
  assert float(sj.cubic_schedule(0.1, init_sparsity=0.9, end_step=5)(5)) == pytest.approx(0.1)


# ----------------------------------------------------- block-sparse matmul


def test_bad_block_sparse_matrix():
  from_dense = sjm.BlockSparseMatrix.from_dense
  w = jnp.ones((8, 8))
  eye = np.eye(4, dtype=bool)
  raises("w must be a [K, N] matrix, got shape (8,)", from_dense, jnp.ones(8), eye)
  raises("w must be a [K, N] matrix, got shape (2, 8, 8)", from_dense, jnp.ones((2, 8, 8)), eye)
  raises("layout must be a 2-d bool array with at least one block, got float32 of shape (4, 4)",
         from_dense, w, eye.astype(np.float32))
  raises("got bool of shape (4,)", from_dense, w, np.ones(4, bool))
  raises("got bool of shape (0, 2)", from_dense, w, np.ones((0, 2), bool))
  raises("got int32 of shape (2, 2)", from_dense, w, jnp.ones((2, 2), jnp.int32))
  raises("layout of shape (3, 3) does not tile w of shape (8, 8)",
         from_dense, w, np.ones((3, 3), bool))
  raises("layout of shape (16, 16) does not tile w of shape (8, 8)",
         from_dense, w, np.ones((16, 16), bool))
  raises("block_shape=(4, 4) but a layout of shape (4, 4) tiles w of shape (8, 8) into (2, 2) "
         "blocks", from_dense, w, eye, block_shape=(4, 4))
  raises("pass layout, or block_shape to use the nonzero blocks of w", from_dense, w)
  raises("block_shape=(3, 3) does not divide w of shape (8, 8)", from_dense, w, block_shape=(3, 3))
  raises("block_shape=(0, 2) does not divide w of shape (8, 8)", from_dense, w, block_shape=(0, 2))
  raises("block_shape=2 must be a pair of integers", from_dense, w, block_shape=2)
  raises("max_per_col=2 but a block column of the layout has 4 active blocks",
         from_dense, w, np.ones((4, 4), bool), max_per_col=2)
  raises("max_per_col=10 must be in [1, 4]", from_dense, w, eye, max_per_col=10)
  raises("max_per_col=1.5 must be an integer", from_dense, w, eye, max_per_col=1.5)
  raises("max_per_row='1' must be an integer", from_dense, w, eye, max_per_row="1")
  raises("a traced layout needs max_per_col and max_per_row",
         jax.jit(lambda m: from_dense(w, m)), jnp.asarray(eye))
  # Nested lists are array-likes.
  listed = from_dense([[1.0, 2.0], [3.0, 4.0]], [[True]])
  np.testing.assert_array_equal(listed.to_dense(), [[1.0, 2.0], [3.0, 4.0]])


def test_bad_block_sparse_matmul():
  w = sjm.BlockSparseMatrix.from_dense(jnp.ones((8, 8)), np.eye(4, dtype=bool))
  x = jnp.ones((3, 8))
  matmul = sjm.block_sparse_matmul
  raises("x of shape (3, 5) cannot multiply w of shape (8, 8): x.shape[-1] must be 8",
         matmul, jnp.ones((3, 5)), w)
  raises("x of shape () cannot multiply w", matmul, jnp.ones(()), w)
  raises("x and w must share one of float32, bfloat16, float16, got x bfloat16 and w float32",
         matmul, x.astype(jnp.bfloat16), w)
  raises("got x int32 and w float32", matmul, x.astype(jnp.int32), w)
  raises("x must be an array [..., K], got list", matmul, x.tolist(), w)
  raises("w must be a sj.matmul.BlockSparseMatrix (BlockSparseMatrix.from_dense), got ArrayImpl",
         matmul, x, jnp.ones((8, 8)))
  raises("unknown implementation 'cuda'", matmul, x, w, implementation="cuda")
  raises("w.row_index has entries outside [0, 4): min 10, max 13",
         matmul, x, w._replace(row_index=w.row_index + 10))
  raises("w.row_index has entries outside [0, 4): min -10", matmul, x,
         w._replace(row_index=w.row_index - 10))
  raises("w.row_index must be an integer array of shape (4, 1), got float32 of shape (4, 1)",
         matmul, x, w._replace(row_index=w.row_index.astype(jnp.float32)))
  raises("w.count has entries outside [0, 2)", matmul, x, w._replace(count=w.count + 5))
  raises("w.t_col must be a 2-d integer array [row_blocks, max_per_row], got shape (4, 1, 1)",
         matmul, x, w._replace(t_col=w.t_col[:, None]))
  raises("w.values must be [col_blocks, max_per_col, bk, bn], got shape (1, 2, 2)",
         matmul, x, w._replace(values=w.values[0]))
  raises("block_m=0 must be an integer >= 1", matmul, x, w, implementation="pallas", block_m=0)
  raises("block_m=-8 must be an integer >= 1", matmul, x, w, implementation="pallas", block_m=-8)


@pytest.mark.parametrize("make, message", [
    (lambda: sjm.block_diagonal_layout((4, 4), 0), "num_blocks=0 must divide both dims of "
                                                   "shape=(4, 4)"),
    (lambda: sjm.block_diagonal_layout((4, 4), 3), "num_blocks=3 must divide both dims"),
    (lambda: sjm.block_diagonal_layout((4, 4), 2.0), "num_blocks=2.0 must be an integer"),
    (lambda: sjm.block_diagonal_layout((4, 4), "2"), "num_blocks='2' must be an integer"),
    (lambda: sjm.block_diagonal_layout((4, 4, 4), 2), "shape=(4, 4, 4) must be a (row_blocks, "
                                                      "col_blocks) pair"),
    (lambda: sjm.block_diagonal_layout(4, 2), "shape=4 must be a (row_blocks, col_blocks) pair"),
    (lambda: sjm.block_diagonal_layout((-4, 4), 2), "shape=(-4, 4) must be positive"),
    (lambda: sjm.block_diagonal_layout((4.5, 4), 2), "shape=(4.5, 4) must be a (row_blocks, "
                                                     "col_blocks) pair of integers"),
    (lambda: sjm.monarch_layouts((4, 4), 4), "monarch_layouts needs row_blocks a multiple of "
                                             "num_blocks**2"),
    (lambda: sjm.monarch_layouts((4, 4), 0), "num_blocks=0"),
    (lambda: sjm.monarch_layouts((16, 16), 2.5), "num_blocks=2.5 must be an integer"),
    (lambda: sjm.butterfly_layout((6, 6)), "butterfly_layout needs the smaller of shape=(6, 6) a "
                                           "power of 2 dividing the larger"),
    (lambda: sjm.butterfly_layout((8, 12)), "the smaller of shape=(8, 12) a power of 2"),
    (lambda: sjm.butterfly_layout((8, 8), 3), "max_stride=3 must be a power of 2 below 8"),
    (lambda: sjm.butterfly_layout((8, 8), 8), "max_stride=8 must be a power of 2 below 8"),
    (lambda: sjm.butterfly_layout((8, 8), 0), "max_stride=0 must be a power of 2 below 8"),
    (lambda: sjm.butterfly_layout((8, 8), 2.5), "max_stride=2.5 must be an integer"),
])
def test_bad_block_patterns(make, message):
  raises(message, make)


@pytest.mark.parametrize("args, kwargs, message", [
    ((10, 8), dict(block_shape=(4, 4)), "block_shape=(4, 4) does not divide w of shape (10, 8)"),
    ((8, 8), dict(block_shape=(0, 4)), "block_shape=(0, 4) does not divide w of shape (8, 8)"),
    ((8, 8), dict(block_shape=(2, 2, 2)), "block_shape=(2, 2, 2) must be a pair of integers"),
    ((8, 8), dict(block_shape=(4, 4), layout=np.ones((4, 4), bool)),
     "layout must be bool of shape (2, 2) (the block grid of a (8, 8) kernel in (4, 4) "
     "blocks), got bool of shape (4, 4)"),
    ((8, 8), dict(block_shape=(4, 4), layout=np.ones((2, 2))), "got float64 of shape (2, 2)"),
    ((8, 8), dict(block_shape=(4, 4), low_rank=-1), "low_rank=-1 must be an integer >= 0"),
    ((8, 8), dict(block_shape=(4, 4), low_rank=1.5), "low_rank=1.5 must be an integer >= 0"),
    ((0, 8), dict(block_shape=(4, 4)), "in_features=0 must be an integer >= 1"),
    ((-4, 8), dict(block_shape=(4, 4)), "in_features=-4 must be an integer >= 1"),
    ((8.0, 8), dict(block_shape=(4, 4)), "in_features=8.0 must be an integer >= 1"),
    ((8, 0), dict(block_shape=(4, 4)), "out_features=0 must be an integer >= 1"),
])
def test_bad_block_sparse_linear(args, kwargs, message):
  raises(message, sj.nn.BlockSparseLinear, *args, rngs=nnx.Rngs(0), **kwargs)


def test_block_sparse_layers_at_call_time():
  layer = sj.nn.BlockSparseLinear(8, 8, block_shape=(4, 4), rngs=nnx.Rngs(0))
  raises("x of shape (2, 6) must end in in_features=8", layer, jnp.ones((2, 6)))
  bad_impl = sj.nn.BlockSparseLinear(8, 8, block_shape=(4, 4), layout=np.eye(2, dtype=bool),
                                     implementation="x", rngs=nnx.Rngs(0))
  raises("unknown implementation 'x'", bad_impl, jnp.ones((2, 8)))
  dense = sj.nn.BlockSparseDense(10, block_shape=(4, 4))
  raises("block_shape=(4, 4) does not divide w of shape (8, 10)", dense.init, KEY, jnp.ones((1, 8)))
  # An all-off layout is valid: only the bias remains.
  off = sj.nn.BlockSparseLinear(8, 8, block_shape=(4, 4), layout=np.zeros((2, 2), bool),
                                rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(off(jnp.ones((2, 8))), np.zeros((2, 8)))


# --------------------------------------------------------------- attention

T = 64


@pytest.fixture(scope="module")
def layout():
  return sja.make_layout(sja.CausalMask((T, T)), num_heads=2, block_q=16, block_kv=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=24), "q_len=64 must be a multiple of block_q=24"),
    (dict(block_kv=24), "kv_len=64 must be a multiple of block_kv=24"),
    (dict(block_q=128), "q_len=64 must be a multiple of block_q=128"),
    (dict(block_q=0), "block_q=0 must be an integer >= 1"),
    (dict(block_kv=-16), "block_kv=-16 must be an integer >= 1"),
    (dict(block_q=16.0), "block_q=16.0 must be an integer >= 1"),
    (dict(block_q="16"), "block_q='16' must be an integer >= 1"),
    (dict(num_heads=0), "num_heads=0 must be an integer >= 1"),
    (dict(num_heads=2.0), "num_heads=2.0 must be an integer >= 1"),
    (dict(mask=sja.MultiHeadMask([sja.CausalMask((T, T))] * 2), num_heads=3),
     "the mask has 2 heads, expected num_heads=3"),
    (dict(mask=np.tril(np.ones((T, T), bool))), "mask must be a sja.Mask, a sja.MultiHeadMask or a "
                                                "sequence of masks, got ndarray; wrap a bool array "
                                                "with sja.NumpyMask"),
    (dict(mask=None), "got NoneType"),
])
def test_bad_make_layout(kwargs, message):
  args = dict(mask=sja.CausalMask((T, T)), num_heads=2, block_q=16, block_kv=16) | kwargs
  raises(message, sja.make_layout, args.pop("mask"), **args)


def test_bad_block_sparse_attention(layout):
  q, k = jnp.ones((1, T, 2, 8)), jnp.ones((1, T, 1, 8))
  attention = sja.block_sparse_attention
  raises("q, k and v must be [batch, seq, heads, head_dim], got q.shape=(64, 2, 8)",
         attention, q[0], k, k, layout)
  raises("k and v must both be [1, kv_len, kv_heads, 8], got k.shape=(1, 64, 1, 8) and "
         "v.shape=(1, 64, 2, 8)", attention, q, k, jnp.ones((1, T, 2, 8)), layout)
  raises("k and v must both be [1, kv_len, kv_heads, 8], got k.shape=(2, 64, 1, 8)",
         attention, q, jnp.ones((2, T, 1, 8)), jnp.ones((2, T, 1, 8)), layout)
  raises("q, k and v must share one of float32, bfloat16, float16, got bfloat16, float32, float32",
         attention, q.astype(jnp.bfloat16), k, k, layout)
  raises("got int32, int32, int32", attention, *(a.astype(jnp.int32) for a in (q, k, k)), layout)
  raises("got float64, float64, float64", attention, np.ones((1, T, 2, 8)), np.ones((1, T, 1, 8)),
         np.ones((1, T, 1, 8)), layout)
  raises("query heads (3) must be a multiple of kv heads (2)", attention, jnp.ones((1, T, 3, 8)),
         jnp.ones((1, T, 2, 8)), jnp.ones((1, T, 2, 8)), layout)
  raises("the layout is for q_len=64, kv_len=64, heads=2; got q_len=32, kv_len=64, heads=2",
         attention, jnp.ones((1, 32, 2, 8)), k, k, layout)
  raises("heads=4", attention, jnp.ones((1, T, 4, 8)), k, k, layout)
  raises("head_dim and kv_heads must be >= 1", attention, jnp.ones((1, T, 2, 0)),
         jnp.ones((1, T, 1, 0)), jnp.ones((1, T, 1, 0)), layout)
  raises("head_dim and kv_heads must be >= 1", attention, q, jnp.ones((1, T, 0, 8)),
         jnp.ones((1, T, 0, 8)), layout)
  raises("q, k and v must be arrays, got list", attention, q.tolist(), k, k, layout)
  raises("layout must be a sja.Layout (make_layout or topk_layout), got CausalMask",
         attention, q, k, k, sja.CausalMask((T, T)))
  raises("unknown implementation 'flash'", attention, q, k, k, layout, implementation="flash")
  raises("sm_scale='x' must be a number", attention, q, k, k, layout, sm_scale="x")
  per_batch = layout._replace(head_row=jnp.zeros((2, 2), jnp.int32))  # as topk_layout builds
  raises("the layout has rows for batch 2, got batch 3", attention, jnp.ones((3, T, 2, 8)),
         jnp.ones((3, T, 1, 8)), jnp.ones((3, T, 1, 8)), per_batch)


def test_bad_topk_layout():
  q, k = jnp.ones((1, T, 2, 8)), jnp.ones((1, T, 1, 8))
  topk_layout = sja.topk_layout
  raises("q_len=64 and kv_len=64 must be multiples of block_q=24 and block_kv=16",
         topk_layout, q, k, block_q=24, block_kv=16, k_blocks=2)
  raises("block_q=0 must be an integer >= 1", topk_layout, q, k, block_q=0, block_kv=16,
         k_blocks=2)
  raises("k_blocks=0 must be an integer >= 1", topk_layout, q, k, block_q=16, block_kv=16,
         k_blocks=0)
  raises("k_blocks=2.0 must be an integer >= 1", topk_layout, q, k, block_q=16, block_kv=16,
         k_blocks=2.0)
  raises("k_blocks=5 must be in [1, 4]", topk_layout, q, k, block_q=16, block_kv=16, k_blocks=5)
  raises("heads=3 must be a multiple of kv_heads=2", topk_layout, jnp.ones((1, T, 3, 8)),
         jnp.ones((1, T, 2, 8)), block_q=16, block_kv=16, k_blocks=2)
  raises("causal routing needs block_q == block_kv, got 16, 32", topk_layout, q, k, block_q=16,
         block_kv=32, k_blocks=1, causal=True)
  raises("q and k must be [batch, seq, heads, head_dim], got q.shape=(64, 2, 8)", topk_layout,
         q[0], k, block_q=16, block_kv=16, k_blocks=2)
  raises("k must be [1, kv_len, kv_heads, 8] to match q, got k.shape=(1, 64, 1, 4)", topk_layout,
         q, jnp.ones((1, T, 1, 4)), block_q=16, block_kv=16, k_blocks=2)


@pytest.mark.parametrize("make, message", [
    (lambda: sja.CausalMask((T, T, T)), "shape=(64, 64, 64) must be (q_len, kv_len) with positive "
                                        "ints"),
    (lambda: sja.CausalMask([T, T]), "shape=[64, 64] must be (q_len, kv_len)"),
    (lambda: sja.FullMask((0, T)), "shape=(0, 64) must be (q_len, kv_len)"),
    (lambda: sja.CausalMask((64.0, 64)), "shape=(64.0, 64) must be (q_len, kv_len)"),
    (lambda: sja.CausalMask((T, T), offset=0.5), "CausalMask: offset=0.5 must be an integer"),
    (lambda: sja.LocalMask((T, T), window=(-1, 0)), "window=(-1, 0) must be (left, right) of ints "
                                                    ">= 0 or None"),
    (lambda: sja.LocalMask((T, T), window=4), "window=4 must be (left, right)"),
    (lambda: sja.LocalMask((T, T), window=(4, 0), offset=1.5), "LocalMask: offset=1.5 must be an "
                                                               "integer"),
    (lambda: sja.ChunkedCausalMask((T, T), chunk=0), "chunk=0 must be an int >= 1"),
    (lambda: sja.ChunkedCausalMask((T, T), chunk=4.0), "chunk=4.0 must be an int >= 1"),
    (lambda: sja.AShapeMask((T, T), sink=-1, window=4), "sink=-1 must be >= 0 and window=4 >= 1"),
    (lambda: sja.AShapeMask((T, T), sink=1, window=0), "sink=1 must be >= 0 and window=0 >= 1"),
    (lambda: sja.AShapeMask((T, T), sink="1", window=4), "AShapeMask: sink='1' must be an integer"),
    (lambda: sja.AShapeMask((T, T), sink=1.5, window=4), "AShapeMask: sink=1.5 must be an integer"),
    (lambda: sja.StridedShardMask((T, T), block=16, num_shards=2, shard=2),
     "need block >= 1, num_shards >= 1 and 0 <= shard < num_shards, got block=16, num_shards=2, "
     "shard=2"),
    (lambda: sja.StridedShardMask((T, T), block=16, num_shards=2, shard=0, local_window=-1),
     "StridedShardMask: local_window=-1 must be an integer >= 0"),
    (lambda: sja.StridedShardMask((T, T), block=16.5, num_shards=2, shard=0),
     "StridedShardMask: block=16.5 must be an integer"),
    (lambda: sja.BigBirdMask((T, T), block=0), "BigBirdMask: block=0 must be an integer >= 1"),
    (lambda: sja.BigBirdMask((T, T), block=16, window=-1), "BigBirdMask: window=-1 must be an "
                                                           "integer >= 0"),
    (lambda: sja.BigBirdMask((T, T), block=16.5), "BigBirdMask: block=16.5 must be an integer"),
    (lambda: sja.VerticalSlashMask((T, T), vertical=(100,), slash=(0,)),
     "VerticalSlashMask: vertical=(100,) must hold key indices in [0, 64), got [100]"),
    (lambda: sja.VerticalSlashMask((T, T), vertical=(-1,), slash=(0,)),
     "vertical=(-1,) must hold key indices in [0, 64), got [-1]"),  # was silently key 63
    (lambda: sja.VerticalSlashMask((T, T), vertical=(0,), slash=(-1,)),
     "VerticalSlashMask: slash=(-1,) must hold diagonal offsets >= 0, got [-1]"),
    (lambda: sja.VerticalSlashMask((T, T), vertical=(1.5,), slash=(0,)), "got [1.5]"),
    (lambda: sja.NumpyMask(np.ones(4, bool)), "NumpyMask needs a non-empty 2-D bool array, got bool "
                                              "of shape (4,)"),
    (lambda: sja.NumpyMask(np.ones((4, 4))), "got float64 of shape (4, 4)"),
    (lambda: sja.NumpyMask(np.ones((0, 4), bool)), "got bool of shape (0, 4)"),
    (lambda: sja.MultiHeadMask([]), "MultiHeadMask needs a non-empty sequence of masks"),
    (lambda: sja.MultiHeadMask([1]), "MultiHeadMask needs a non-empty sequence of masks"),
    (lambda: sja.MultiHeadMask([sja.CausalMask((T, T)), sja.CausalMask((32, 32))]),
     "head masks differ in shape: [(32, 32), (64, 64)]"),
    (lambda: sja.CausalMask((T, T)) & sja.CausalMask((32, 32)), "mask shapes differ: (64, 64) and "
                                                                "(32, 32)"),
    (lambda: sja.CausalMask((T, T)) & 1, "can only combine masks with masks, got int"),
    (lambda: sja.CausalMask((T, T)) and sja.CausalMask((T, T)),
     "a mask has no truth value: combine masks with & and |, not and/or"),
    (lambda: sja.CausalMask((T, T))[0], "index masks with two slices, mask[q0:q1, k0:k1], got 0"),
])
def test_bad_attention_masks(make, message):
  raises(message, make)


# ------------------------------------------------------------ NaN gradients

NAN_METHODS = ["magnitude_uniform", "rigl_uniform", "set_erk", "n_m_sr_ste", "srigl"]
# The update call with count t sets the masks of step t + 1 from the params it
# sees; step 4 is a mask update step of every method above (update_every
# 2, or 1 for N:M), so the call with count 3 both takes the NaN gradient and
# updates the masks.
POISONED_STEP = 3
GROWS_BY_GRADIENT = {"rigl_uniform", "srigl"}
DROPS_BY_MAGNITUDE = {"magnitude_uniform", "rigl_uniform", "set_erk"}  # per leaf, unstructured


def _poison(grads):
  """NaN in row 0 of dense1's kernel and in all of out's kernel."""
  dense1 = grads["dense1"]["kernel"].at[0].set(jnp.nan)
  return {**grads, "dense1": {**grads["dense1"], "kernel": dense1},
          "out": {**grads["out"], "kernel": jnp.full_like(grads["out"]["kernel"], jnp.nan)}}


def _kernels(tree):
  return {k: np.asarray(tree[k]["kernel"]) for k in ("dense0", "dense1", "out")}


def _pruned_are_zero_or_nan(masks, params):
  for m, p in zip(_kernels(masks).values(), _kernels(params).values()):
    pruned = p[~m]
    assert np.all((pruned == 0) | np.isnan(pruned)), "a pruned weight is finite and nonzero"


def _nan_weights_rank_lowest(name, before, after, seen):
  """At a mask update that sees NaN weights, they are dropped before any finite one."""
  before, after, seen = _kernels(before), _kernels(after), _kernels(seen)
  if name in DROPS_BY_MAGNITUDE:
    for leaf in ("dense1", "out"):
      nan = before[leaf] & np.isnan(seen[leaf])
      dropped = before[leaf] & ~after[leaf]
      assert not (dropped & ~nan).any() or not (after[leaf] & nan).any(), (
          f"{leaf}: a finite weight was dropped while a NaN one was kept")
    # Not vacuous: row 0 of dense1 held NaN weights, and this update dropped some.
    assert (before["dense1"] & ~after["dense1"] & np.isnan(seen["dense1"])).any()
  if name == "n_m_sr_ste":
    for leaf in ("dense1", "out"):  # 2:4 groups along axis -2, on the dense params
      groups = lambda a: np.moveaxis(a, -2, -1).reshape(-1, 4)
      keep, finite = groups(after[leaf]), groups(np.isfinite(seen[leaf]))
      np.testing.assert_array_equal((keep & finite).sum(-1), np.minimum(2, finite.sum(-1)))
    assert np.isnan(seen["dense1"][0]).all()  # every group of dense1 held a NaN


@pytest.mark.parametrize("name", NAN_METHODS)
def test_nan_gradients_never_corrupt_the_masks(name):
  """NaN gradients at a mask update step leave every mask boolean and exactly counted.

  Documented behaviour (README, "How sparsify works"): an update cannot bring a
  NaN weight to zero (``nan + x`` is nan), so NaN weights that are pruned
  later stay NaN in the params; `apply_masks` zeroes them. The masks
  themselves never change dtype, shape or count, and NaN scores rank lowest:
  the poisoned update grows nothing where the gradient is NaN, and the next
  mask update, which sees the NaN weights, drops them first.
  """
  entry = METHODS[name]
  tx = sj.sparsify(optax.adam(1e-2), entry.make())

  @jax.jit
  def step(params, state, batch, poison):
    grads = jax.grad(lambda p: loss_fn(forward_params(p, state, entry), batch))(params)
    grads = jax.tree.map(lambda bad, g: jnp.where(poison, bad, g), _poison(grads), grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = make_params()
  state = jax.jit(tx.init)(params)
  if not is_dense(entry):
    params = sj.apply_masks(params, sj.get_masks(state))
  # The next mask update after the poisoned one sees its NaN weights.
  nan_update = POISONED_STEP + (1 if is_dense(entry) else 2)
  for i, batch in enumerate(batches(POISONED_STEP + 3)):
    before = sj.get_masks(state)
    seen, (params, state) = params, step(params, state, batch, i == POISONED_STEP)
    masks = sj.get_masks(state)
    applied = sj.apply_masks(params, masks)  # validates structure, shapes and dtype
    assert masks["dense0"]["bias"] is None
    if i <= POISONED_STEP or is_dense(entry):
      # On the params themselves: until the poisoned step every weight the
      # masks were chosen from was finite, so even the weights pruned at it
      # land on exactly 0. N:M masks must be those of the dense params the
      # update saw, NaN included.
      assert_exact(masks, checked(params, masks, entry, seen), entry, i)
    else:
      assert_exact(masks, applied, entry, i)  # exact counts
      _pruned_are_zero_or_nan(masks, params)
    if i == nan_update:
      _nan_weights_rank_lowest(name, before, masks, seen)
    if i == POISONED_STEP:
      assert bool(jnp.isnan(params["out"]["kernel"]).any()), "the NaN gradient did not land"
      if name in GROWS_BY_GRADIENT:
        # A NaN gradient ranks lowest for growth: row 0 of dense1 (NaN) grows
        # nothing while entries with finite gradients are inactive in its leaf.
        grown = _kernels(masks)["dense1"] & ~_kernels(before)["dense1"]
        assert grown.sum() > 0 and not grown[0].any()


# ------------------------------------------------------- hypothesis properties

FAMILIES = ["static_random", "magnitude", "set_evolution", "rigl", "granet", "srigl", "n_m"]


def _is_update_step(t, update_every, end_step=None):
  """`sj.update_steps` with begin_step=0, written out: does step t get new masks?"""
  if t <= 0 or (end_step is not None and t > end_step):
    return False
  return t % update_every == 0 or t == end_step


def _build(family, data, sparsity, update_every):
  """A method, kept(shape, step) per leaf for the masks of `step`, and its update rule."""
  keep = lambda density, n: int(np.round(np.float32(density) * np.float32(n)))
  uniform = lambda s: (lambda shape, step: keep(np.float32(1) - np.float32(s), np.prod(shape)))
  end = data.draw(st.integers(0, 6), label="end_step")
  rule = lambda t: _is_update_step(t, update_every, end)
  every = lambda t: _is_update_step(t, update_every)
  common = dict(end_step=end, update_every=update_every, distribution="uniform", key=KEY)
  if family == "static_random":
    return (sj.static_random(sparsity, distribution="uniform", key=KEY), uniform(sparsity),
            lambda t: False)
  if family == "magnitude":
    return (sj.magnitude(sparsity, update_every=update_every, distribution="uniform"),
            uniform(sparsity), every)
  if family == "set_evolution":
    return sj.set_evolution(sparsity, **common), uniform(sparsity), rule
  if family == "rigl":
    return sj.rigl(sparsity, **common), uniform(sparsity), rule
  if family == "srigl":
    per_column = lambda shape, step: keep(np.float32(1) - np.float32(sparsity), shape[0]) * shape[1]
    return sj.srigl(sparsity, ablation_threshold=0.0, **common), per_column, rule
  if family == "granet":
    init = data.draw(st.floats(0.0, sparsity), label="init_sparsity")
    schedule = sj.cubic_schedule(sparsity, init_sparsity=init, end_step=end)

    def granet_sparsity(step):  # the schedule at the last mask change (step 0: init)
      return float(schedule(max([0] + [u for u in range(1, step + 1) if rule(u)])))

    return (sj.granet(sparsity, init_sparsity=init, **common),
            lambda shape, step: uniform(granet_sparsity(step))(shape, step), rule)
  n = data.draw(st.integers(0, 4), label="n")
  estimator = data.draw(st.sampled_from(["hard", "ste", "sr_ste"]), label="estimator")
  return (sj.n_m(n, 4, estimator=estimator, update_every=update_every),
          lambda shape, step: int(np.prod(shape)) * n // 4, every)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_invariants_on_random_pytrees(data):
  """After every jitted step: bool masks of the params' shapes, exact kept counts, zero pruned.

  The update call with count t sets the masks of step t + 1, from the params
  it saw, at the steps of `sj.update_steps`.
  """
  family = data.draw(st.sampled_from(FAMILIES), label="family")
  sparsity = data.draw(st.floats(0.1, 0.95), label="sparsity")
  update_every = data.draw(st.integers(1, 3), label="update_every")
  n_steps = data.draw(st.integers(1, 5), label="steps")
  rows = st.integers(1, 3).map(lambda r: 4 * r) if family == "n_m" else st.integers(1, 12)
  shapes = data.draw(st.lists(st.tuples(rows, st.integers(1, 12)), min_size=1, max_size=3),
                     label="shapes")
  method, kept, is_update_step = _build(family, data, sparsity, update_every)
  # Host random values: jax.random.normal would compile for every new shape.
  normal = lambda rng, shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
  params = {f"layer{i}": {"kernel": normal(np.random.default_rng(i), s),
                          "bias": jnp.zeros(s[1])} for i, s in enumerate(shapes)}
  # Steps large enough to reorder the weights; the random gradients reach
  # every entry, so only the wrapper keeps inactive ones (and their moments) at 0.
  tx = sj.sparsify(optax.adam(0.3), method)
  state = jax.jit(tx.init)(params)
  dense = method.dense_params
  if not dense:
    params = sj.apply_masks(params, sj.get_masks(state))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = [params]  # the params of steps 0, 1, ...
  masks = sj.get_masks(state)
  for t in range(n_steps):
    previous = masks
    rng = np.random.default_rng(100 + t)
    grads = jax.tree.map(lambda p: normal(rng, p.shape), params)  # pylint: disable=cell-var-from-loop
    params, state = step(params, state, grads)
    history.append(params)
    masks = sj.get_masks(state)
    assert int(state.count) == t + 1  # the masks of step t + 1
    last_change = max([0] + [u for u in range(1, t + 2) if is_update_step(u)])
    for i, shape in enumerate(shapes):
      name = f"layer{i}"
      mask = np.asarray(masks[name]["kernel"])
      assert masks[name]["bias"] is None
      assert mask.dtype == np.bool_ and mask.shape == shape
      assert int(mask.sum()) == kept(shape, t + 1), (family, name, shape, t)
      weights = np.asarray(params[name]["kernel"])
      if dense:
        # N:M masks come from the dense params the last mask change saw, exactly
        # n of every 4 along axis -2; the params themselves stay dense.
        n = kept((4, 1), t + 1)  # kept per group of 4
        np.testing.assert_array_equal(mask.reshape(shape[0] // 4, 4, shape[1]).sum(1), n)
        seen = history[max(last_change - 1, 0)]  # what the update that set them saw
        np.testing.assert_array_equal(mask, sj.n_m_mask(jnp.abs(seen[name]["kernel"]), n, 4))
      else:
        # On the params themselves: pruned weights are exactly zero, and so are
        # the weights grown at this step, with zero optimizer state.
        grown = mask & ~np.asarray(previous[name]["kernel"])
        assert np.all(weights[~mask] == 0), "a pruned weight is nonzero"
        assert np.all(weights[grown] == 0), "a weight grown at this step is nonzero"
        for moment in ("mu", "nu"):
          inner = np.asarray(optax.tree.get(state, moment)[name]["kernel"])
          assert np.all(inner[~mask | grown] == 0), f"{moment} is nonzero at an inactive entry"
