"""Sparse fine-tuning: deltas of a fixed budget over a frozen base, selectors and merging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

ft = sj.finetune


def problem(seed=0, sparse=False):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((32, 24)).astype(np.float32)
  if sparse:
    w[rng.random(w.shape) < 0.5] = 0.0
  base = {"hidden": {"kernel": jnp.asarray(w), "bias": jnp.zeros(24)},
          "out": {"kernel": jnp.asarray(rng.standard_normal((24, 8)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)

  def loss(p):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None])
    return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

  return base, loss


def selectors(base):
  tuned = jax.tree.map(lambda a: a + 0.01 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)
                       % 0.3, base)
  return {"spiel": ft.spiel(0.1, update_every=3, key=jax.random.key(0)),
          "lt_sft": ft.lt_sft(0.1, finetuned=tuned),
          "s2ft": ft.s2ft(0.1, key=jax.random.key(1)),
          "fixed": ft.fixed({"hidden": {"kernel": jnp.arange(0, 768, 7), "bias": None},
                             "out": {"kernel": jnp.arange(5, 192, 3)}})}


def train(tx, base, loss, steps=8):
  state = tx.init(base)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, history = base, []
  for _ in range(steps):
    params, state = step(params, state)
    history.append((params, ft.get_delta(state)))
  return params, state, history


@pytest.mark.parametrize("name", ["spiel", "lt_sft", "s2ft", "fixed"])
def test_delta_trains_only_its_entries_at_a_fixed_count(name):
  base, loss = problem()
  tx = ft.sparse_delta(optax.adam(1e-2), selectors(base)[name])
  params, state, history = train(tx, base, loss)
  assert float(loss(params)) < float(loss(base)) - 1e-3
  np.testing.assert_array_equal(params["hidden"]["bias"], base["hidden"]["bias"])  # frozen
  ever = {k: np.zeros(base[k]["kernel"].size, bool) for k in ("hidden", "out")}
  counts = set()
  for p, delta in history:
    for k in ("hidden", "out"):
      d = delta[k]["kernel"]
      assert len(np.unique(np.asarray(d.indices))) == d.indices.size  # distinct
      counts.add((k, d.indices.size))
      ever[k][np.asarray(d.indices)] = True
      merged = ft.merge(base, delta)[k]["kernel"]
      np.testing.assert_allclose(merged, p[k]["kernel"], atol=1e-6)  # params == base + delta
  assert len(counts) == 2  # one count per leaf, at every step
  for k in ("hidden", "out"):  # entries never in the delta are the base's, bit for bit
    never = ~ever[k]
    np.testing.assert_array_equal(np.asarray(params[k]["kernel"]).reshape(-1)[never],
                                  np.asarray(base[k]["kernel"]).reshape(-1)[never])
  assert delta["hidden"]["bias"] is None


def test_values_follow_the_dense_gradient_at_their_indices():
  base, loss = problem(1)
  tx = ft.sparse_delta(optax.sgd(0.5), ft.s2ft(0.25, key=jax.random.key(2), axis=0))
  state = tx.init(base)
  grads = jax.grad(loss)(base)
  updates, state = tx.update(grads, state, base)
  d = ft.get_delta(state)["hidden"]["kernel"]
  want = -0.5 * np.asarray(grads["hidden"]["kernel"]).reshape(-1)[np.asarray(d.indices)]
  np.testing.assert_allclose(d.values, want, rtol=1e-6)
  rows = np.unique(np.asarray(d.indices) // 24)  # S2FT along axis 0: whole rows
  assert len(rows) == 8 and d.indices.size == 8 * 24
  np.testing.assert_allclose(np.asarray(updates["hidden"]["kernel"])[rows], -0.5 * np.asarray(
      grads["hidden"]["kernel"])[rows], rtol=1e-6)


def test_spiel_drops_small_and_grows_steep_disjoint_entries():
  base, loss = problem(2)
  tx = ft.sparse_delta(optax.adam(1e-2), ft.spiel(0.1, update_every=3, key=jax.random.key(3),
                                                  drop_fraction=0.5))
  _, _, history = train(tx, base, loss, steps=3)
  before, after = history[1][1]["hidden"]["kernel"], history[2][1]["hidden"]["kernel"]
  old, new = np.asarray(before.indices), np.asarray(after.indices)
  moved = old != new
  assert moved.sum() == round(0.5 * old.size)  # half the slots
  assert not set(new[moved]) & set(old)  # grown entries were inactive
  # The slots that moved held the smallest |delta| after this step's optimizer update.
  values = np.abs(np.asarray(before.values))
  assert values[moved].max() <= np.sort(values)[moved.sum()] + 1e-6
  np.testing.assert_array_equal(np.asarray(after.values)[moved], 0.0)  # restart at zero


def test_state_memory_scales_with_the_budget_not_the_leaf():
  sizes = {}
  for rows in (64, 1024):
    base = {"w": jnp.ones((rows, 64))}
    k = 256
    indices = {"w": jnp.arange(k)}
    tx = ft.sparse_delta(optax.adam(1e-3), ft.fixed(indices))
    sizes[rows] = ft.state_bytes(jax.eval_shape(tx.init, base))
  assert sizes[64] == sizes[1024] <= 4 * 256 * 4 + 64  # indices, values, two moments
  assert ft.state_bytes(jax.eval_shape(optax.adam(1e-3).init, {"w": jnp.ones((1024, 64))})) > (
      50 * sizes[1024])


@pytest.mark.parametrize("name", ["spiel", "s2ft"])
def test_a_sparse_base_keeps_its_zeros_through_training_and_merging(name):
  base, loss = problem(3, sparse=True)
  zeros = {k: np.asarray(base[k]["kernel"]) == 0 for k in ("hidden", "out")}
  tx = ft.sparse_delta(optax.adamw(1e-2), selectors(base)[name], sparse_base=True)
  params, state, _ = train(tx, base, loss)
  other, _, _ = train(ft.sparse_delta(optax.sgd(1e-1), ft.spiel(
      0.2, update_every=2, key=jax.random.key(9)), sparse_base=True), base, loss)
  merged = ft.merge(base, ft.get_delta(state), ft.get_delta(_state(other, base)),
                    weights=(0.5, 0.5))
  for k in ("hidden", "out"):
    assert np.any(np.asarray(params[k]["kernel"]) != np.asarray(base[k]["kernel"]))
    np.testing.assert_array_equal(np.asarray(params[k]["kernel"])[zeros[k]], 0.0)
    np.testing.assert_array_equal(np.asarray(merged[k]["kernel"])[zeros[k]], 0.0)


def _state(params, base):
  """A delta state holding ``params - base`` on its nonzero entries (for merging)."""
  diff = jax.tree.map(lambda p, b: (p - b).reshape(-1), params, base)
  return ft.SparseDeltaState(jnp.zeros((), jnp.int32), {
      k: {"kernel": ft.SparseDelta(jnp.nonzero(diff[k]["kernel"], size=int(
          (diff[k]["kernel"] != 0).sum()))[0].astype(jnp.int32), diff[k]["kernel"][
              diff[k]["kernel"] != 0]), **({"bias": None} if k == "hidden" else {})}
      for k in ("hidden", "out")}, None, None)


def test_works_in_chain_inject_hyperparams_and_nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  base, loss = problem(4)
  selector = ft.spiel(0.1, update_every=2, key=jax.random.key(5))
  for tx in (optax.chain(optax.clip_by_global_norm(1.0), ft.sparse_delta(optax.adam(1e-2),
                                                                         selector)),
             optax.inject_hyperparams(lambda learning_rate: ft.sparse_delta(
                 optax.adam(learning_rate), selector))(learning_rate=1e-2)):
    params, state, _ = train(tx, base, loss, steps=4)
    assert float(loss(params)) < float(loss(base))
    np.testing.assert_allclose(ft.merge(base, ft.get_delta(state))["out"]["kernel"],
                               params["out"]["kernel"], atol=1e-6)

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 16, rngs=rngs)
      self.b = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))

  model = MLP(nnx.Rngs(0))
  start = nnx.state(model, nnx.Param)
  start = jax.tree.map(jnp.copy, start)
  opt = nnx.Optimizer(model, ft.sparse_delta(optax.adam(1e-2), selector), wrt=nnx.Param)
  x = jnp.ones((4, 8))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)

  for _ in range(3):
    step(model, opt)
  kernel = model.a.kernel[...]
  changed = int(jnp.sum(kernel != start["a"]["kernel"][...]))
  assert 0 < changed <= 2 * round(0.1 * kernel.size)  # its delta, and entries it left
  np.testing.assert_array_equal(model.a.bias[...], start["a"]["bias"][...])


def test_bad_input():
  base, _ = problem()
  with pytest.raises(ValueError, match=r"spiel: density=0 must be a float in \(0, 1\]"):
    ft.spiel(0, update_every=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"s2ft: density=1.5 must be a float in \(0, 1\]"):
    ft.s2ft(1.5, key=jax.random.key(0))
  with pytest.raises(ValueError, match="selector must be a sj.finetune.Selector"):
    ft.sparse_delta(optax.adam(1e-3), "spiel")
  small = {"w": jnp.ones((4, 4))}
  delta = ft.get_delta(ft.sparse_delta(optax.sgd(1.0), ft.spiel(
      0.5, update_every=1, key=jax.random.key(0))).init(base))
  with pytest.raises(ValueError, match="a delta from another model"):
    ft.merge(small, delta)
  with pytest.raises(ValueError, match=r"finetuned at params\['out'\]\['kernel'\] has shape"):
    ft.sparse_delta(optax.sgd(1.0), ft.lt_sft(
        0.1, finetuned={**base, "out": {"kernel": jnp.ones((3, 3))}})).init(base)
  with pytest.raises(ValueError, match=r"s2ft: axis=3 is outside params\['hidden'\]\['kernel'\]"):
    ft.sparse_delta(optax.sgd(1.0), ft.s2ft(0.1, key=jax.random.key(0), axis=3)).init(base)
  with pytest.raises(ValueError, match="indices at params"):
    ft.sparse_delta(optax.sgd(1.0), ft.fixed(
        {"hidden": {"kernel": jnp.array([0, 0]), "bias": None},
         "out": {"kernel": jnp.array([1])}})).init(base)


def test_sparse_plus_low_rank_trains_both_parts_by_their_gradients():
  base, loss = problem(6)
  tx = ft.sparse_delta(optax.sgd(0.3), ft.s2ft(0.1, key=jax.random.key(1)), rank=2,
                       key=jax.random.key(2))
  state = tx.init(base)
  d0 = ft.get_delta(state)["out"]["kernel"]
  assert d0.a.shape == (24, 2) and d0.b.shape == (2, 8) and not np.any(np.asarray(d0.b))
  # The parts' gradients are those of the loss through base + delta.
  params = ft.merge(base, ft.get_delta(state))
  np.testing.assert_array_equal(params["out"]["kernel"], base["out"]["kernel"])  # starts at 0
  want = jax.grad(lambda a, b: loss({**params, "out": {"kernel": params["out"]["kernel"]
                                                                + a @ b}}),
                  argnums=(0, 1))(jnp.zeros_like(d0.a) + d0.a, d0.b)
  _, state = tx.update(jax.grad(loss)(params), state, params)
  d1 = ft.get_delta(state)["out"]["kernel"]
  np.testing.assert_allclose(d1.a - d0.a, -0.3 * want[0], atol=1e-6)
  np.testing.assert_allclose(d1.b - d0.b, -0.3 * want[1], atol=1e-6)
  assert np.any(np.asarray(d1.b))
  # Once b is nonzero, a's gradient is too: check the second step against autodiff.
  params = ft.merge(base, ft.get_delta(state))
  dense = params["out"]["kernel"] - d1.a @ d1.b
  want = jax.grad(lambda a, b: loss({**params, "out": {"kernel": dense + a @ b}}),
                  argnums=(0, 1))(d1.a, d1.b)
  assert float(jnp.abs(want[0]).max()) > 1e-4
  _, state = tx.update(jax.grad(loss)(params), state, params)
  d2 = ft.get_delta(state)["out"]["kernel"]
  np.testing.assert_allclose(d2.a - d1.a, -0.3 * want[0], atol=1e-6)
  np.testing.assert_allclose(d2.b - d1.b, -0.3 * want[1], atol=1e-6)
  params, state, _ = train(tx, base, loss, steps=4)
  np.testing.assert_allclose(ft.merge(base, ft.get_delta(state))["out"]["kernel"],
                             params["out"]["kernel"], atol=1e-5)
  with pytest.raises(ValueError, match="cannot keep a sparse base's zeros"):
    ft.sparse_delta(optax.sgd(0.1), ft.s2ft(0.1, key=jax.random.key(1)), rank=2,
                    key=jax.random.key(2), sparse_base=True)


def test_state_saves_and_restores_with_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  base, loss = problem(7)
  tx = ft.sparse_delta(optax.adam(1e-2), ft.spiel(0.1, update_every=2, key=jax.random.key(0)))
  params, state, _ = train(tx, base, loss, steps=3)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  grads = jax.grad(loss)(params)
  want, _ = tx.update(grads, state, params)
  got, _ = tx.update(grads, restored, params)
  np.testing.assert_array_equal(got["out"]["kernel"], want["out"]["kernel"])
