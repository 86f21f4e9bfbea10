"""The contract every sparsity method keeps, checked over a registry of all methods.

Later methods add an entry to METHODS; every test here then covers them.
"""

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx

import sparsejax as sj

_POLY = sj.cubic_schedule(0.9, end_step=8)


@dataclasses.dataclass(frozen=True)
class Entry:
  make: Callable[[], sj.SparsityMethod]
  # Sparsity the masks must have after the update call with this count
  # (the masks of the next step).
  sparsity_at: Callable[[int], float]
  distribution: str
  # Kept entries per leaf when a method counts otherwise (SRigL: per neuron).
  kept: Callable[[list, float], list] | None = None


def _every(n, schedule):
  return lambda step: float(schedule(n * ((step + 1) // n)))


METHODS = {
    "static_random_uniform": Entry(
        lambda: sj.static_random(0.8, distribution="uniform", key=jax.random.key(0)),
        lambda step: 0.8, "uniform"),
    "static_random_erk": Entry(
        lambda: sj.static_random(0.8, distribution="erk", key=jax.random.key(1)), lambda step: 0.8, "erk"),
    "magnitude_uniform": Entry(
        lambda: sj.magnitude(_POLY, update_every=2, distribution="uniform"), _every(2, _POLY),
        "uniform"),
    "magnitude_erk": Entry(
        lambda: sj.magnitude(_POLY, update_every=2, distribution="erk"), _every(2, _POLY), "erk"),
    "magnitude_global": Entry(
        lambda: sj.magnitude(_POLY, update_every=2, distribution="global"), _every(2, _POLY),
        "global"),
    "magnitude_one_shot": Entry(
        lambda: sj.magnitude(sj.one_shot(0.75, step=3), update_every=1, distribution="uniform"),
        lambda step: 0.75 if step + 1 >= 3 else 0.0, "uniform"),
    "snip_global": Entry(lambda: sj.snip(0.85), lambda step: 0.85, "global"),
    "snip_erk": Entry(lambda: sj.snip(0.85, distribution="erk"), lambda step: 0.85, "erk"),
    "set_erk": Entry(
        lambda: sj.set_evolution(0.8, end_step=9, update_every=2, key=jax.random.key(2)),
        lambda step: 0.8, "erk"),
    "rigl_uniform": Entry(
        lambda: sj.rigl(0.8, end_step=9, update_every=2, distribution="uniform",
                        key=jax.random.key(3)),
        lambda step: 0.8, "uniform"),
    "rigl_block": Entry(
        lambda: sj.rigl(0.75, end_step=9, update_every=2, distribution="uniform",
                        granularity=sj.Block((8, 1)), key=jax.random.key(3)),
        lambda step: 0.75, "uniform_blocks_8x1"),
    "granet_dense_to_sparse": Entry(
        lambda: sj.granet(0.9, end_step=8, update_every=2, key=jax.random.key(4)),
        lambda step: float(sj.cubic_schedule(0.9, end_step=8)(2 * (min(step + 1, 8) // 2))),
        "erk"),
    "granet_sparse_to_sparse": Entry(
        lambda: sj.granet(0.9, init_sparsity=0.5, end_step=8, update_every=2,
                          distribution="uniform", key=jax.random.key(5)),
        lambda step: float(sj.cubic_schedule(0.9, init_sparsity=0.5, end_step=8)(2 * (min(step + 1, 8) // 2))),
        "uniform"),
    **{f"n_m_{estimator}": Entry(
        lambda estimator=estimator: sj.n_m(
            2, 4, axis=-2, estimator=estimator,
            grad_scale=optax.linear_schedule(1.0, 0.0, 6) if estimator == "decay" else None),
        lambda step: 0.5, "n_m", kept=lambda shapes, s: [int(np.prod(x)) // 2 for x in shapes])
       for estimator in ("hard", "ste", "sr_ste", "decay")},
    "srigl": Entry(
        lambda: sj.srigl(0.8, end_step=9, update_every=2, ablation_threshold=0.0,
                         key=jax.random.key(6)),
        lambda step: 0.8, "erk",
        kept=lambda shapes, s: [
            int(np.round(np.float32(d) * np.float32(np.prod(shape[:-1])))) * shape[-1]
            for d, shape in zip(sj.ERK().densities(shapes, s), shapes)]),
}

# One entry per method (the others vary distributions and estimators).
FAMILIES = ("static_random_erk", "magnitude_global", "snip_global", "set_erk", "rigl_block",
            "granet_dense_to_sparse", "n_m_sr_ste", "srigl")
# FAMILIES and the entries whose schedules or granularity differ from their
# family's: the state's types could differ there. The others change only the
# distribution, which sets which entries are kept, or (n_m hard and ste) the
# constant gradient scale and decay; their states match their family's leaf for leaf.
STATE_VARIANTS = FAMILIES + ("magnitude_one_shot", "rigl_uniform", "granet_sparse_to_sparse",
                             "n_m_decay")

OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.5),
}
# Every entry trains with adam; each method once more with one of the other
# optimizers, so that each of them meets fixed, pruning and drop-and-grow
# methods (momentum and weight decay at regrown entries) and adamw the
# straight-through one.
OTHER_OPTIMIZER = {"static_random_erk": "adamw", "magnitude_global": "sgd_momentum",
                   "snip_global": "adamw", "set_erk": "sgd_momentum", "rigl_block": "adamw",
                   "granet_dense_to_sparse": "sgd_momentum", "n_m_sr_ste": "adamw",
                   "srigl": "sgd_momentum"}
assert set(OTHER_OPTIMIZER) == set(FAMILIES)


def make_params(key=0):
  k = jax.random.split(jax.random.key(key), 4)
  return {
      "dense0": {"kernel": jax.random.normal(k[0], (8, 24)) * 0.5, "bias": jnp.zeros(24)},
      "dense1": {"kernel": jax.random.normal(k[1], (24, 16)) * 0.3, "bias": jnp.zeros(16)},
      "out": {"kernel": jax.random.normal(k[2], (16, 3)) * 0.3, "bias": jnp.zeros(3)},
  }


def forward(params, x):
  h = jnp.tanh(x @ params["dense0"]["kernel"] + params["dense0"]["bias"][None])
  h = jnp.tanh(h @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
  return h @ params["out"]["kernel"] + params["out"]["bias"][None]


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((forward(params, x) - y) ** 2)


def batches(n, seed=0):
  key = jax.random.key(seed)
  for i in range(n):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    yield jax.random.normal(kx, (32, 8)), jax.random.normal(ky, (32, 3))


def expected_kept(distribution, shapes, sparsity):
  """Exact kept counts per leaf (or the total, for global) in float32 as the library rounds."""
  keep = lambda d, n: int(np.round(np.float32(d) * np.float32(n)))
  if distribution == "uniform_blocks_8x1":
    return [8 * keep(np.float32(1) - np.float32(sparsity), int(np.prod(s)) // 8) for s in shapes]
  if distribution == "uniform":
    return [keep(np.float32(1) - np.float32(sparsity), int(np.prod(s))) for s in shapes]
  if distribution == "erk":
    densities = sj.ERK().densities(shapes, sparsity)
    return [keep(float(d), int(np.prod(s))) for d, s in zip(densities, shapes)]
  total = sum(int(np.prod(s)) for s in shapes)
  return keep(np.float32(1) - np.float32(sparsity), total)


def assert_exact(masks, params, entry, step):
  sparse = [(m, p) for m, p in zip(jax.tree.leaves(masks), _sparsified(masks, params))]
  counts = [int(m.sum()) for m, _ in sparse]
  shapes = [m.shape for m, _ in sparse]
  if entry.kept is not None:
    want = entry.kept(shapes, entry.sparsity_at(step))
  else:
    want = expected_kept(entry.distribution, shapes, entry.sparsity_at(step))
  if entry.distribution == "global":
    assert sum(counts) == want, f"step {step}: {counts} do not sum to {want}"
  else:
    assert counts == want, f"step {step}: kept {counts}, expected {want}"
  for m, p in sparse:
    p = np.asarray(p)
    assert np.all(p[~np.asarray(m)] == 0), f"step {step}: a pruned weight is nonzero"


def is_dense(entry):
  """Straight-through methods keep params dense; the checks use the exported model."""
  return entry.make().dense_params


def forward_params(params, state, entry):
  """What the forward pass sees: straight-through masked params for dense methods."""
  return sj.apply_masks(params, sj.get_masks(state), ste=True) if is_dense(entry) else params


def checked(params, masks, entry, seen):
  """The params whose pruned entries must be exactly zero.

  Straight-through methods keep dense params: their masks must be the exact
  N:M masks of the magnitudes of `seen`, the params the last update saw, and
  the model they export is the params where the masks are True.
  """
  if not is_dense(entry):
    return params
  for m, p in zip(jax.tree.leaves(masks), _sparsified(masks, seen)):
    np.testing.assert_array_equal(m, sj.n_m_mask(jnp.abs(p), 2, 4))
  return jax.tree.map(lambda m, p: p if m is None else np.where(m, p, 0), masks, params,
                      is_leaf=lambda x: x is None)


def _sparsified(masks, params):
  return [p for m, p in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None),
                            jax.tree.leaves(params)) if m is not None]


def train(tx, entry, params, n_steps=10, check=True):
  state = jax.jit(tx.init)(params)
  if not is_dense(entry):  # straight-through methods keep dense shadow weights
    params = sj.apply_masks(params, sj.get_masks(state))

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: loss_fn(forward_params(p, state, entry), batch))(params)
    updates, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    return optax.apply_updates(params, updates), state

  for i, batch in enumerate(batches(n_steps)):
    seen, (params, state) = params, step(params, state, batch)
    if check:
      masks = sj.get_masks(state)
      assert_exact(masks, checked(params, masks, entry, seen), entry, i)
  if check and is_dense(entry):  # shadow weights stay dense
    masks = sj.get_masks(state)
    pruned = [np.asarray(p)[~np.asarray(m)] for m, p in zip(jax.tree.leaves(masks),
                                                           _sparsified(masks, params))]
    assert all(np.count_nonzero(p) > 0 for p in pruned)
  return params, state


@pytest.mark.parametrize("name, optimizer", [
    (name, optimizer) for name in sorted(METHODS) for optimizer in sorted(OPTIMIZERS)
    if optimizer == "adam" or OTHER_OPTIMIZER.get(name) == optimizer])
def test_exact_sparsity_and_zero_pruned_weights(name, optimizer):
  entry = METHODS[name]
  tx = sj.sparsify(OPTIMIZERS[optimizer](), entry.make())
  params, state = train(tx, entry, make_params())
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  masks = sj.get_masks(state)
  assert masks["dense0"]["bias"] is None
  assert int((params["dense0"]["bias"] != 0).sum()) > 0  # dense leaves train


@pytest.mark.parametrize("name", STATE_VARIANTS)
def test_state_is_stable_and_never_retraced(name):
  entry = METHODS[name]
  tx = sj.sparsify(optax.adam(1e-2), entry.make())
  params = make_params()
  state = tx.init(params)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, batch, pred):
    grads = jax.grad(lambda p: loss_fn(forward_params(p, state, entry), batch))(params)
    # Under a random lax.cond the branches must agree on the state's type.
    updates, state = jax.lax.cond(
        pred, lambda: tx.update(grads, state, params),
        lambda: (jax.tree.map(jnp.zeros_like, grads), state))
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for batch in batches(10):
    params, state = step(params, state, batch, bool(rng.random() < 0.8))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes


@pytest.mark.parametrize("name", FAMILIES)  # the wrapper, not the entry, meets the chain
def test_inside_chain_and_inject_hyperparams(name):
  """Second in a chain, under inject_hyperparams (one run: both wrap the wrapper)."""
  entry = METHODS[name]
  injected = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(optax.clip_by_global_norm(1.0),
                                        sj.sparsify(optax.adam(learning_rate), entry.make())))(
          learning_rate=1e-2)
  _, state = train(injected, entry, make_params())
  assert isinstance(state.inner_state, tuple) and len(state.inner_state) == 2  # the chain's
  assert optax.tree.get(state, "masks") is not None
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_wraps_an_injected_optimizer():
  entry = METHODS["rigl_block"]  # the wrapper, not the method, meets the inner state here
  inner_injected = sj.sparsify(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
                               entry.make())
  train(inner_injected, entry, make_params())


def test_sparsity_is_injectable():
  tx = optax.inject_hyperparams(
      lambda sparsity: sj.sparsify(optax.adam(1e-2), sj.magnitude(
          sparsity, update_every=1, distribution="uniform")))(
          sparsity=0.5)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.grad(loss_fn)(params, next(batches(1)))
  for sparsity in [0.5, 0.5, 0.7, 0.9]:
    state.hyperparams["sparsity"] = jnp.asarray(sparsity)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    kernel = sj.get_masks(state)["dense1"]["kernel"]
    assert int(kernel.sum()) == int(np.round(np.float32(1 - np.float32(sparsity)) * 384))


@pytest.mark.parametrize("make_inner", [
    lambda: optax.lion(1e-3, weight_decay=0.1),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1.0)),
    lambda: optax.sgd(optax.exponential_decay(0.1, 5, 0.5), momentum=0.9, nesterov=True),
    lambda: optax.masked(optax.adam(1e-2), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    lambda: optax.partition(
        {"kernel": optax.adam(1e-2), "bias": optax.sgd(0.1)},
        lambda p: jax.tree.map(lambda x: "kernel" if x.ndim > 1 else "bias", p)),
    lambda: optax.contrib.muon(1e-2),
], ids=["lion", "chain_clip_adamw", "sgd_nesterov_schedule", "masked", "partition", "muon"])
def test_other_inner_optimizers(make_inner):
  entry = METHODS["magnitude_erk"]
  train(sj.sparsify(make_inner(), entry.make()), entry, make_params())


def test_inner_state_is_zero_at_pruned_entries():
  entry = METHODS["magnitude_uniform"]
  _, state = train(sj.sparsify(optax.adam(1e-2), entry.make()), entry, make_params())
  masks = sj.get_masks(state)
  for moment in ("mu", "nu"):
    tree = optax.tree.get(state, moment)
    for m, s in zip(jax.tree.leaves(masks), _sparsified(masks, tree)):
      assert np.all(np.asarray(s)[~np.asarray(m)] == 0)
      assert np.any(np.asarray(s)[np.asarray(m)] != 0)


def test_dtypes_are_kept():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
  params["out"]["kernel"] = params["out"]["kernel"].astype(jnp.float32)
  entry = METHODS["magnitude_uniform"]
  out, _ = train(sj.sparsify(optax.adam(1e-2), entry.make()), entry, params)
  chex.assert_trees_all_equal_dtypes(out, params)


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.dense0 = nnx.Linear(8, 24, rngs=rngs)
    self.dense1 = nnx.Linear(24, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.dense1(jnp.tanh(self.dense0(x)))))


@pytest.mark.parametrize("name", FAMILIES)  # the wrapper, not the entry, meets nnx
def test_nnx_optimizer(name):
  entry = METHODS[name]
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sj.sparsify(optax.adamw(1e-2), entry.make()), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    if is_dense(entry):  # the forward pass sees the straight-through masked params
      masks = sj.get_masks(optimizer.opt_state)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss(params):
        m = nnx.merge(graphdef, sj.apply_masks(params, masks, ste=True), rest)
        return jnp.mean((m(x) - y) ** 2)

      grads = jax.grad(loss)(params)
    else:
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for i, (x, y) in enumerate(batches(8)):
    seen = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    step(model, optimizer, x, y)
    masks = sj.get_masks(optimizer.opt_state)
    params = nnx.state(model, nnx.Param)
    pure = checked(jax.tree.map(np.asarray, nnx.to_pure_dict(params)), nnx.to_pure_dict(masks),
                   entry, seen)
    assert_exact(masks, pure, entry, i)
  assert optax.tree.get(optimizer.opt_state, "masks") is not None
  assert masks["dense0"]["bias"] is None
  if not is_dense(entry):
    pruned = sj.apply_masks(params, masks)
    chex.assert_trees_all_equal(nnx.to_pure_dict(pruned), nnx.to_pure_dict(params))


def test_nnx_filters_choose_leaves():
  model = NnxMLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  method = sj.magnitude(0.5)
  where = sj.nnx_filter(nnx.All(nnx.Param, nnx.PathContains("dense1")))
  state = sj.sparsify(optax.sgd(0.1), method, where=where).init(params)
  masks = sj.get_masks(state)
  assert masks["dense0"]["kernel"] is None and masks["out"]["kernel"] is None
  assert masks["dense1"]["bias"] is not None and masks["dense1"]["kernel"] is not None
  state = sj.sparsify(optax.sgd(0.1), method, where=r"^out/").init(params)
  masks = sj.get_masks(state)
  assert masks["out"]["kernel"] is not None and masks["out"]["bias"] is not None
  assert masks["dense1"]["kernel"] is None


class LinenMLP(linen.Module):

  @linen.compact
  def __call__(self, x):
    x = jnp.tanh(linen.Dense(24)(x))
    x = jnp.tanh(linen.Dense(16)(x))
    return linen.Dense(3)(x)


@pytest.mark.parametrize("name", FAMILIES)  # linen params are plain dicts, as in the tests above
def test_flax_linen_params(name):
  entry = METHODS[name]
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))
  tx = sj.sparsify(optax.adam(1e-2), entry.make())
  state = tx.init(params)
  params = sj.apply_masks(params, sj.get_masks(state))

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(lambda p: jnp.mean((model.apply(forward_params(p, state, entry), x) - y) ** 2))(
        params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i, (x, y) in enumerate(batches(8)):
    seen, (params, state) = params, step(params, state, x, y)
    masks = sj.get_masks(state)
    assert_exact(masks, checked(params, masks, entry, seen), entry, i)
  assert sj.get_masks(state)["params"]["Dense_0"]["bias"] is None
