"""Post-training pruning: calibration statistics, Wanda, SparseGPT, DSnoT, OWL and `sj.fixed`."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


class Layer(nnx.Module):
  """One Dense layer: the unit the reconstruction tests measure."""

  def __init__(self, w):
    self.dense = nnx.Linear(*w.shape, use_bias=False, rngs=nnx.Rngs(0))
    self.dense.kernel.set_value(jnp.asarray(w))

  def __call__(self, x):
    return self.dense(x)


def outlier_layer(d_in=64, d_out=32, n=1024, seed=0):
  """A layer whose inputs have a few outlier channels and a nonzero mean."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)).astype(np.float32) + 0.5
  x[:, [c for c in (3, 9, 17, 40, 41) if c < d_in]] *= 20.0
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  return Layer(w), x, w


def kernel(params):
  return np.asarray(params["dense"]["kernel"].get_value())


def error(x, w, pruned):
  return float(np.linalg.norm(x @ w - x @ pruned))


@pytest.mark.parametrize("rule", [dict(sparsity=0.5), dict(pattern=(2, 4))], ids=["50%", "2:4"])
def test_error_aware_rules_beat_magnitude_on_outlier_inputs(rule):
  model, x, w = outlier_layer()
  calibration = sj.calibrate(model, [x[:512], x[512:]])
  magnitude = sj.prune.magnitude(model, calibration, **rule)
  wanda = sj.prune.wanda(model, calibration, **rule)
  masks, params = sj.prune.sparsegpt(model, calibration, **rule)
  dsnot = sj.prune.dsnot(model, calibration, wanda, pattern=rule.get("pattern"))
  m = lambda t: np.asarray(t["dense"]["kernel"])  # noqa: E731
  errors = {"magnitude": error(x, w, w * m(magnitude)), "wanda": error(x, w, w * m(wanda)),
            "sparsegpt": error(x, w, kernel(params)), "dsnot": error(x, w, w * m(dsnot))}
  assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
  assert errors["dsnot"] < errors["wanda"], errors
  for mask in (magnitude, wanda, masks, dsnot):  # every output keeps half its inputs
    np.testing.assert_array_equal(m(mask).sum(0), np.full(32, 32))
  np.testing.assert_array_equal(kernel(params) != 0, m(masks))
  if "pattern" in rule:
    for mask in (wanda, masks, dsnot):
      np.testing.assert_array_equal(m(mask).reshape(16, 4, 32).sum(1), 2)


def obs_reference(w, gram, sparsity, block, group="output", n_m=None, dampening=0.01):
  """SparseGPT written column by column in float64, without lazy batching."""
  w = w.astype(np.float64).copy()
  h = gram.astype(np.float64).copy()
  d_in, d_out = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  h += dampening * np.mean(np.diag(h)) * np.eye(d_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  d = np.diag(u)
  mask = np.zeros(w.shape, bool)
  kept = lambda r: int(np.round((1 - sparsity) * r))  # noqa: E731
  for c in range(0, d_in, block):
    rows = min(block, d_in - c)
    if n_m is None:
      score = w[c:c + rows] ** 2 / d[c:c + rows, None] ** 2
      if group == "output":
        k = kept(c + rows) - kept(c)
        top = np.argsort(-score, axis=0, kind="stable")[:k]
        np.put_along_axis(mask[c:c + rows], top, True, axis=0)
      else:
        k = kept((c + rows) * d_out) - kept(c * d_out)
        flat = np.zeros(score.size, bool)
        flat[np.argsort(-score.reshape(-1), kind="stable")[:k]] = True
        mask[c:c + rows] = flat.reshape(score.shape)
    for i in range(c, c + rows):
      if n_m is not None and i % n_m[1] == 0:
        score = w[i:i + n_m[1]] ** 2 / d[i:i + n_m[1], None] ** 2
        top = np.argsort(-score, axis=0, kind="stable")[:n_m[0]]
        np.put_along_axis(mask[i:i + n_m[1]], top, True, axis=0)
      q = np.where(mask[i], w[i], 0.0)
      err = (w[i] - q) / u[i, i]
      w[i:] -= np.outer(u[i, i:], err)
      w[i] = q
  return mask, w


@pytest.mark.parametrize("case", [dict(sparsity=0.5, group="output"),
                                  dict(sparsity=0.5, group="layer"),
                                  dict(pattern=(2, 4))], ids=["output", "layer", "2:4"])
def test_sparsegpt_matches_numpy_obs_reference(case):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(256, 12)).astype(np.float32)
  w = rng.normal(size=(12, 6)).astype(np.float32)
  model = Layer(w)
  calibration = sj.calibrate(model, [x])
  masks, params = sj.prune.sparsegpt(model, calibration, block_size=8, **case)
  gram = np.asarray(calibration["dense/kernel"].gram)
  want_mask, want_w = obs_reference(w, gram, case.get("sparsity"), 8, case.get("group", "output"),
                                    case.get("pattern"))
  np.testing.assert_array_equal(np.asarray(masks["dense"]["kernel"]), want_mask)
  np.testing.assert_allclose(kernel(params), want_w, rtol=2e-4, atol=2e-4)


def test_sparsegpt_at_zero_sparsity_returns_the_weights():
  model, x, w = outlier_layer(d_in=16, d_out=8, n=128)
  masks, params = sj.prune.sparsegpt(model, sj.calibrate(model, [x]), sparsity=0.0)
  assert np.all(np.asarray(masks["dense"]["kernel"]))
  np.testing.assert_array_equal(kernel(params), w)


@pytest.mark.parametrize("group", ["output", "layer"])
def test_exact_counts_and_block_tiles(group):
  model, x, w = outlier_layer(d_in=32, d_out=16, n=256)
  calibration = sj.calibrate(model, [x])
  for masks in (sj.prune.wanda(model, calibration, sparsity=0.3, group=group),
                sj.prune.sparsegpt(model, calibration, sparsity=0.3, group=group,
                                   block_size=8)[0]):
    m = np.asarray(masks["dense"]["kernel"])
    if group == "output":
      np.testing.assert_array_equal(m.sum(0), np.full(16, round(0.7 * 32)))
    else:
      assert m.sum() == round(0.7 * 32 * 16)
  block = sj.Block((4, 4))
  for masks in (sj.prune.wanda(model, calibration, sparsity=0.5, pattern=block, group=group),
                sj.prune.sparsegpt(model, calibration, sparsity=0.5, pattern=block, group=group,
                                   block_size=8)[0]):
    tiles = np.asarray(masks["dense"]["kernel"]).reshape(8, 4, 4, 4).transpose(0, 2, 1, 3)
    assert np.all(tiles.all((2, 3)) | ~tiles.any((2, 3)))  # every tile on or off
    on = tiles.all((2, 3))
    if group == "output":
      np.testing.assert_array_equal(on.sum(0), np.full(4, 4))
    else:
      assert on.sum() == 16


class Tiny(nnx.Module):
  """A pre-norm transformer block: attention projections (one Einsum) and an MLP."""

  def __init__(self, rngs):
    self.q = nnx.Linear(16, 16, rngs=rngs)
    self.k = nnx.Linear(16, 16, rngs=rngs)
    self.v = nnx.Linear(16, 16, rngs=rngs)
    self.out = nnx.Einsum("btnh,nhd->btd", (4, 4, 16), rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)
    self.embed = nnx.Embed(8, 16, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, 4, 4)  # noqa: E731
    o = jax.nn.dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
    x = x + self.out(o)
    return x + self.down(jax.nn.gelu(self.up(x)))


def tiny_data(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(4, 8, 16)).astype(np.float32) + 0.3 for _ in range(2)]


def test_calibration_statistics_equal_stored_activations():
  model, batches = Tiny(nnx.Rngs(0)), tiny_data()
  calibration = sj.calibrate(model, batches)
  assert [l.path for l in calibration.layers] == [
      "q/kernel", "k/kernel", "v/kernel", "out/kernel", "up/kernel", "down/kernel"]
  assert [l.group for l in calibration.layers] == [0, 0, 0, 1, 2, 3]
  assert calibration.stats["embed"]["embedding"] is None
  inputs = {p: [] for p in ("q", "out", "up", "down")}
  for x in batches:
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, 4, 4)  # noqa: E731
    o = jax.nn.dot_product_attention(heads(model.q(x)), heads(model.k(x)), heads(model.v(x)))
    h = x + model.out(o)
    u = jax.nn.gelu(model.up(h))
    inputs["q"].append(x.reshape(-1, 16))
    inputs["out"].append(np.asarray(o).reshape(-1, 16))  # (n, h) flattened in the kernel's order
    inputs["up"].append(np.asarray(h).reshape(-1, 16))
    inputs["down"].append(np.asarray(u).reshape(-1, 32))
  for name, rows in inputs.items():
    rows = np.concatenate(rows).astype(np.float64)
    stats = calibration[f"{name}/kernel"]
    assert int(stats.count) == rows.shape[0]
    np.testing.assert_allclose(stats.sum, rows.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.sum_sq, (rows ** 2).sum(0), rtol=1e-4)
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-4, atol=1e-3)
  layer = calibration.layers[3]  # the Einsum: its kernel as a [d_in, d_out] matrix and back
  w = model.out.kernel.get_value()
  np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(w)), w)
  assert layer.to_matrix(w).shape == (16, 16)


def test_sequential_recalibrates_on_pruned_layers():
  model, batches = Tiny(nnx.Rngs(1)), tiny_data(1)
  calibration = sj.calibrate(model, batches)
  one_pass, params_1 = sj.prune.sparsegpt(model, calibration, sparsity=0.5, sequential=False)
  seq, params_s = sj.prune.sparsegpt(model, calibration, sparsity=0.5)
  same = lambda a, b: bool(np.array_equal(a, b))  # noqa: E731
  for name in ("q", "k", "v"):  # the first group sees the same inputs either way
    assert same(seq[name]["kernel"], one_pass[name]["kernel"])
  assert not same(params_s["down"]["kernel"].get_value(), params_1["down"]["kernel"].get_value())
  # What the last layer was pruned on: the inputs of the model with every earlier layer pruned.
  pruned = nnx.merge(*nnx.split(model, nnx.Param, ...)[::2][:1], params_s,
                     nnx.split(model, nnx.Param, ...)[2])
  again = sj.prune.sparsegpt(pruned, sj.calibrate(pruned, batches), sparsity=0.5,
                             sequential=False)[0]
  assert same(again["down"]["kernel"], seq["down"]["kernel"])


def test_owl_sparsities_average_to_the_target_within_the_band():
  model, batches = Tiny(nnx.Rngs(2)), tiny_data(2)
  calibration = sj.calibrate(model, batches, gram=False)
  sparsities = sj.prune.owl(model, calibration, sparsity=0.7, threshold=2.0, band=0.1)
  values = {l.path: sparsities[l.path.split("/")[0]]["kernel"] for l in calibration.layers}
  sizes = {l.path: l.d_in * l.d_out for l in calibration.layers}
  mean = sum(values[p] * sizes[p] for p in values) / sum(sizes.values())
  assert mean == pytest.approx(0.7, abs=1e-6)
  assert all(0.6 - 1e-9 <= v <= 0.8 + 1e-9 for v in values.values())
  assert max(values.values()) - min(values.values()) > 0.05  # the ratios differ here
  masks = sj.prune.wanda(model, calibration, sparsity=sparsities, sequential=False)
  for path, s in values.items():
    m = np.asarray(masks[path.split("/")[0]]["kernel"])
    layer = next(l for l in calibration.layers if l.path == path)
    kept = np.asarray(layer.to_matrix(m)).sum(0)
    np.testing.assert_array_equal(kept, round((1 - s) * layer.d_in))
  overrides = sj.prune.overrides(sparsities)
  assert overrides["^up/kernel$"] == values["up/kernel"]
  scores = {n: {"kernel": jnp.abs(getattr(model, n).kernel.get_value())}  # via a distribution
            for n in ("q", "k", "v", "out", "up", "down")}
  scores["embed"] = {"embedding": jnp.abs(model.embed.embedding.get_value())}
  masks = sj.masks_from_scores(scores, 0.5, distribution=sj.Uniform(overrides=overrides))
  assert int(masks["up"]["kernel"].sum()) == round((1 - values["up/kernel"]) * 16 * 32)
  assert int(masks["embed"]["embedding"].sum()) == 64  # not overridden: the 0.5 of the pool


def test_fixed_keeps_pruned_weights_zero_through_adamw():
  model, x, w = outlier_layer(d_in=16, d_out=8, n=128)
  masks, params = sj.prune.sparsegpt(model, sj.calibrate(model, [x]), sparsity=0.75)
  nnx.update(model, params)
  optimizer = nnx.Optimizer(model, sj.sparsify(optax.adamw(1e-2, weight_decay=0.1),
                                               sj.fixed(masks)), wrt=nnx.Param)
  target = x @ w

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(5):
    step(model, optimizer)
  k = np.asarray(model.dense.kernel.get_value())
  m = np.asarray(masks["dense"]["kernel"])
  assert np.all(k[~m] == 0) and np.all(k[m] != 0)
  assert not np.allclose(k, kernel(params))  # the kept weights trained


def test_fixed_in_chain_and_inject_hyperparams_and_bad_masks():
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.ones(6),
            "v": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  masks = {"w": jnp.asarray(rng.random((8, 6)) < 0.3), "b": None, "v": None}
  tx = optax.chain(optax.clip_by_global_norm(1.0), sj.sparsify(
      optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.5),
      sj.fixed(masks)))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  w = np.asarray(params["w"])
  assert np.all(w[~np.asarray(masks["w"])] == 0) and np.all(w[np.asarray(masks["w"])] != 0)
  assert np.all(np.asarray(params["v"]) != 0)  # selected by the default where, left dense
  assert sj.get_masks(state)["v"].all()
  with pytest.raises(ValueError, match=r"masks\['w'\] has shape \(6, 8\), the param has shape"):
    sj.sparsify(optax.sgd(0.1), sj.fixed({"w": masks["w"].T, "b": None, "v": None})).init(params)
  with pytest.raises(ValueError, match=r"masks\['b'\] is a mask, but sparsify's `where` leaves"):
    sj.sparsify(optax.sgd(0.1), sj.fixed({"w": masks["w"], "b": jnp.ones(6, bool),
                                          "v": None})).init(params)
  with pytest.raises(ValueError, match=r"masks\['w'\] must be a bool array"):
    sj.fixed({"w": jnp.ones((8, 6)), "b": None, "v": None})


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="a")(x))
    return nn.Einsum((16, 2, 4), "bd,dnh->bnh", name="e")(h)


def test_linen_model():
  x = np.random.default_rng(3).normal(size=(64, 8)).astype(np.float32)
  net = LinenNet()
  variables = net.init(jax.random.key(0), x)
  calibration = sj.calibrate(net, [x], variables=variables)
  assert [l.path for l in calibration.layers] == ["a/kernel", "e/kernel"]
  by_apply = sj.calibrate(net.apply, [x], variables=variables)  # apply_fn + params works too
  np.testing.assert_array_equal(by_apply["e/kernel"].gram, calibration["e/kernel"].gram)
  masks, params = sj.prune.sparsegpt(variables["params"], calibration, pattern=(2, 4))
  assert masks["a"]["bias"] is None and masks["e"]["kernel"].shape == (16, 2, 4)
  assert np.asarray(masks["e"]["kernel"]).reshape(4, 4, 8).sum(1).tolist() == [[2] * 8] * 4
  np.testing.assert_allclose(calibration["a/kernel"].sum, x.sum(0), rtol=1e-5)
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0)


class MyDense(nnx.Module):
  """A custom layer: calibrated when listed in `types`, read as a Dense."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (6, 5)))

  def __call__(self, x):
    return x @ self.kernel[...]


class Custom(nnx.Module):

  def __init__(self, rngs):
    self.general = nnx.LinearGeneral((4, 2), 6, axis=(-2, -1), rngs=rngs)
    self.mine = MyDense(rngs)

  def __call__(self, x):
    return self.mine(jax.nn.relu(self.general(x)))


def test_custom_layers_and_linear_general():
  x = np.random.default_rng(6).normal(size=(32, 4, 2)).astype(np.float32)
  model = Custom(nnx.Rngs(0))
  assert [l.path for l in sj.calibrate(model, [x]).layers] == ["general/kernel"]
  calibration = sj.calibrate(model, [x], types=(MyDense,))
  assert [l.path for l in calibration.layers] == ["general/kernel", "mine/kernel"]
  rows = x.reshape(32, 8).astype(np.float64)
  np.testing.assert_allclose(calibration["general/kernel"].gram, rows.T @ rows, rtol=1e-5)
  h = np.asarray(jax.nn.relu(model.general(x)), np.float64)
  np.testing.assert_allclose(calibration["mine/kernel"].sum, h.sum(0), rtol=1e-4)
  masks = sj.prune.wanda(model, calibration, pattern=(1, 2))
  assert masks["general"]["kernel"].shape == (4, 2, 6)  # 1:2 over the flattened (4, 2) inputs
  np.testing.assert_array_equal(np.asarray(masks["general"]["kernel"]).sum(1), 1)
  assert sj.calibrate(model, [x], types=(MyDense,), where="mine").layers[0].path == "mine/kernel"


def test_bad_input():
  model, x, w = outlier_layer(d_in=12, d_out=4, n=64)
  with pytest.raises(ValueError, match=r"layer dense/kernel \(Linear\) takes inputs .* \(12,\)"):
    sj.calibrate(model, [x[:, :8]])
  with pytest.raises(ValueError, match="batches is empty"):
    sj.calibrate(model, [])

  class Unused(nnx.Module):
    def __init__(self):
      self.used = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      self.spare = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.used(x)

  with pytest.raises(ValueError, match=r"\['spare/kernel'\] have no statistics"):
    sj.calibrate(Unused(), [x[:, :4]])
  calibration = sj.calibrate(model, [x])
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"sparsity=.* must lie in \[0, 1\)"):
      sj.prune.wanda(model, calibration, sparsity=bad)
  with pytest.raises(ValueError, match=r"m to divide d_in of dense/kernel \(d_in = 12"):
    sj.prune.sparsegpt(model, calibration, pattern=(2, 5))
  with pytest.raises(ValueError, match="leave sparsity= out"):
    sj.prune.wanda(model, calibration, sparsity=0.5, pattern=(2, 4))
  with pytest.raises(ValueError, match="give sparsity="):
    sj.prune.wanda(model, calibration)
  duplicated = np.concatenate([x[:, :6], x[:, :6]], axis=1)  # rank 6 of 12: singular X^T X
  with pytest.raises(ValueError, match=r"dense/kernel is singular .* dampening > 0"):
    sj.prune.sparsegpt(model, sj.calibrate(model, [duplicated]), sparsity=0.5, dampening=0.0)
  with pytest.raises(ValueError, match="calibrate with gram=True"):
    sj.prune.sparsegpt(model, sj.calibrate(model, [x], gram=False), sparsity=0.5)
  with pytest.raises(ValueError, match="has no value for calibrated layer dense/kernel"):
    sj.prune.wanda(model, calibration, sparsity={"dense": {"kernel": None}})
  with pytest.raises(ValueError, match="must be a flax nnx Module or a linen Module"):
    sj.calibrate(lambda x: x, [x])


def sharded_check():
  """Run by `test_sharded_params` on 8 simulated devices: sharded equals single-device."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  batches = tiny_data(4)
  model = Tiny(nnx.Rngs(4))
  want_masks, want_params = sj.prune.sparsegpt(model, sj.calibrate(model, batches), sparsity=0.5)

  def spec(x):
    return P(*([None] * (x.ndim - 1)), "model") if x.shape[-1] % 4 == 0 else P()

  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), state))
  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  calibration = sj.calibrate(model, sharded)
  masks, params = sj.prune.sparsegpt(model, calibration, sparsity=0.5)
  for path in ("q", "out", "down"):
    got = params[path]["kernel"].get_value()
    assert got.sharding.spec == getattr(model, path).kernel.get_value().sharding.spec
    np.testing.assert_array_equal(masks[path]["kernel"], want_masks[path]["kernel"])
    np.testing.assert_allclose(got, want_params[path]["kernel"].get_value(), rtol=1e-4, atol=1e-5)
  print("sharded pruning equals single-device pruning")


def test_sharded_params():
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded pruning equals single-device pruning" in result.stdout


if __name__ == "__main__":
  sharded_check()
