"""Activation sparsity: top-k with a straight-through gradient, ReLU², ProSparse's penalty."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src import calibration as calibration_lib

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


# --- training-free: calibrated thresholds (TEAL, CHESS, WINA) -----------------

D_IN, D_HIDDEN = 32, 64


class _MLP(nnx.Module):

  def __init__(self, rngs, row_norms=None):
    self.up = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs)
    self.down = nnx.Linear(D_HIDDEN, D_IN, rngs=rngs)
    if row_norms is not None:  # planted: input j multiplies a row of norm row_norms[j]
      k = self.up.kernel[...]
      self.up.kernel[...] = k / jnp.linalg.norm(k, axis=1, keepdims=True) * row_norms[:, None]

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def _inputs(seed, tokens, scales):
  """Heavy-tailed inputs (Student t, 3 dof) with a scale per channel."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_t(3, (tokens, D_IN)) * scales, jnp.float32)


def _layer_inputs(model, x):
  return {"up/kernel": x, "down/kernel": jax.nn.gelu(model.up(x))}


SCALES = np.geomspace(0.05, 5.0, D_IN)


def _rules(model, calibration, sparsity):
  return {"teal": act.teal(calibration, sparsity=sparsity),
          "chess": act.chess(calibration, sparsity=sparsity),
          "wina": act.wina(model, calibration, sparsity=sparsity)}


def test_histogram_quantiles_and_cdf_match_the_data():
  model = _MLP(nnx.Rngs(0))
  x = _inputs(0, 4096, SCALES)
  stats = sj.calibrate(model, [x[:2048], x[2048:]], histogram=True, gram=False)["up/kernel"]
  assert stats.abs_hist.shape == (D_IN, calibration_lib.HIST_BINS)
  np.testing.assert_array_equal(stats.abs_hist.sum(1), 4096)
  a = np.abs(np.asarray(x))
  for q in [0.1, 0.5, 0.9]:
    np.testing.assert_allclose(stats.abs_quantile(q), np.quantile(a, q), rtol=0.02)
    np.testing.assert_allclose(stats.abs_quantile(q, per_channel=True), np.quantile(a, q, 0),
                               rtol=0.05)
    t = stats.abs_quantile(q, per_channel=True)
    np.testing.assert_allclose(calibration_lib.hist_cdf(stats.abs_hist, t), q, atol=1e-3)
  assert float(stats.abs_quantile(0.0)) == 0.0


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_thresholds_reach_the_target_sparsity_on_held_out_data(sparsity):
  model = _MLP(nnx.Rngs(0))
  x = _inputs(0, 8192, SCALES)
  calibration = sj.calibrate(model, [x[i:i + 2048] for i in range(0, 8192, 2048)],
                             histogram=True, gram=False)
  held_out = _layer_inputs(model, _inputs(1, 8192, SCALES))
  held_out_calibration = sj.calibrate(model, [_inputs(1, 8192, SCALES)], histogram=True,
                                      gram=False)
  for name, thresholds in _rules(model, calibration, sparsity).items():
    estimated = act.input_sparsity(held_out_calibration, thresholds)
    for path in ["up/kernel", "down/kernel"]:
      t = thresholds[path.split("/")[0]]["kernel"][None]
      assert t.shape == (1, held_out[path].shape[1]) and t.dtype == jnp.float32
      reached = float(jnp.mean(jnp.abs(held_out[path]) <= t))
      assert abs(reached - sparsity) <= 0.01, (name, path, reached)
      assert abs(float(estimated[path]) - reached) <= 0.005, (name, path)
    assert thresholds["up"]["bias"] is None


def test_wina_and_channel_wise_thresholds_beat_one_threshold_on_planted_data():
  # Small inputs meet large weight rows (as after a folded norm): one magnitude
  # threshold zeroes the channels that matter, by their scale alone.
  model = _MLP(nnx.Rngs(0), row_norms=jnp.asarray(1.0 / SCALES, jnp.float32))
  x = _inputs(0, 8192, SCALES)
  calibration = sj.calibrate(model, [x], histogram=True, gram=False)
  held_out = _inputs(1, 4096, SCALES)
  dense = model.up(held_out)
  errors = {}
  for name, thresholds in _rules(model, calibration, 0.5).items():
    t = thresholds["up"]["kernel"][None]
    sparse = model.up(jnp.where(jnp.abs(held_out) > t, held_out, 0))
    assert abs(float(jnp.mean(jnp.abs(held_out) <= t)) - 0.5) <= 0.01
    errors[name] = float(jnp.mean((sparse - dense) ** 2))
  assert errors["wina"] < 0.5 * errors["teal"] and errors["chess"] < 0.5 * errors["teal"], errors


def test_sparsify_inputs_thresholds_linear_inputs_and_keeps_the_params():
  model = _MLP(nnx.Rngs(0))
  x = _inputs(0, 2048, SCALES)
  calibration = sj.calibrate(model, [x], histogram=True, gram=False)
  thresholds = act.teal(calibration, sparsity=0.6)
  sparse = sj.nn.sparsify_inputs(nnx.clone(model), thresholds)
  assert isinstance(sparse.up, sj.nn.SparseInputLinear) and isinstance(model.up, nnx.Linear)
  dense_params, sparse_params = nnx.state(model, nnx.Param), nnx.state(sparse, nnx.Param)
  assert jax.tree.structure(dense_params) == jax.tree.structure(sparse_params)
  jax.tree.map(np.testing.assert_array_equal, dense_params, sparse_params)
  t_up, t_down = thresholds["up"]["kernel"][None], thresholds["down"]["kernel"][None]

  def expected(x):
    h = jax.nn.gelu(model.up(jnp.where(jnp.abs(x) > t_up, x, 0)))
    return model.down(jnp.where(jnp.abs(h) > t_down, h, 0))

  rows = x[:8]
  want = expected(rows)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sparse, rows), want, rtol=1e-5, atol=1e-5)
  one = nnx.jit(lambda m, x: m(x))(sparse, rows[:1])  # decode: the sparse-input matmul
  np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(want - model(rows)))) > 1e-3  # the thresholds did something


def _sizes_and_sparsities(calibration, sparsities):
  return [(l.d_in * l.d_out, sparsities[l.path.split("/")[0]]["kernel"])
          for l in calibration.layers]


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.95])  # 0.33: the last raise gives back
def test_allocate_keeps_the_size_weighted_mean_exactly(sparsity):
  model = _MLP(nnx.Rngs(0))
  calibration = sj.calibrate(model, [_inputs(0, 2048, SCALES)], histogram=True, gram=False)
  sparsities = act.allocate(model, calibration, sparsity=sparsity)
  assert sparsities["up"]["bias"] is None
  pairs = _sizes_and_sparsities(calibration, sparsities)
  assert all(0.0 <= s <= 0.95 for _, s in pairs)
  mean = sum(n * s for n, s in pairs) / sum(n for n, _ in pairs)
  assert mean == pytest.approx(sparsity, abs=1e-9)


def test_allocate_gives_more_to_the_layer_whose_inputs_are_mostly_small():
  # Gaussian inputs to the first layer; the second sees their GELU, about
  # half of it near zero, so zeroing its smallest inputs costs less. Equal sizes.
  model = _MLP(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8192, D_IN)), jnp.float32)
  calibration = sj.calibrate(model, [x], histogram=True, gram=False)
  sparsities = act.allocate(model, calibration, sparsity=0.5)
  up, down = sparsities["up"]["kernel"], sparsities["down"]["kernel"]
  assert down > up + 0.1 and (up + down) / 2 == pytest.approx(0.5)
  held_out = jnp.asarray(rng.standard_normal((4096, D_IN)), jnp.float32)
  dense = model(held_out)

  def error(s):
    sparse = sj.nn.sparsify_inputs(nnx.clone(model), act.teal(calibration, sparsity=s))
    return float(jnp.mean((sparse(held_out) - dense) ** 2))

  assert error(sparsities) < 0.8 * error(0.5)  # measured: 0.57x


def test_training_free_bad_input():
  model = _MLP(nnx.Rngs(0))
  x = _inputs(0, 256, SCALES)
  calibration = sj.calibrate(model, [x], histogram=True, gram=False)
  with pytest.raises(ValueError, match=r"sparsity=1.0 must lie in \[0, 1\)"):
    act.teal(calibration, sparsity=1.0)
  with pytest.raises(ValueError, match=r"sparsity=-0.1 must lie in \[0, 1\)"):
    act.chess(calibration, sparsity=-0.1)
  with pytest.raises(ValueError, match="calibrate with sj.calibrate.*histogram=True"):
    act.teal(sj.calibrate(model, [x], gram=False), sparsity=0.5)
  with pytest.raises(ValueError, match="calibration must be what sj.calibrate returned"):
    act.teal({"up": None}, sparsity=0.5)
  with pytest.raises(ValueError, match=r"takes inputs whose dims \(-1,\) are \(32,\), got an "
                     r"input of shape \(256, 31\)"):
    sj.calibrate(model, [x[:, :31]], histogram=True)
  with pytest.raises(ValueError, match="params has no kernel of shape"):
    act.wina({"up": {"kernel": jnp.ones((3, 3))}}, calibration, sparsity=0.5)
  with pytest.raises(ValueError, match="params has no kernel of shape"):
    act.allocate({"up": {"kernel": jnp.ones((3, 3))}}, calibration, sparsity=0.5)
  with pytest.raises(ValueError, match=r"sparsity=0.97 must be at most 0.95, the highest "
                     r"multiple of step=0.05 below 1"):
    act.allocate(model, calibration, sparsity=0.97)
  with pytest.raises(ValueError, match=r"step=0 must be in \(0, 0.5\]"):
    act.allocate(model, calibration, sparsity=0.5, step=0)
  with pytest.raises(ValueError, match="calibrate with sj.calibrate.*histogram=True"):
    act.allocate(model, sj.calibrate(model, [x], gram=False), sparsity=0.5)
  thresholds = act.teal(calibration, sparsity=0.5)
  with pytest.raises(ValueError, match=r"thresholds at up/kernel have shape \(31,\); the layer "
                     "takes 32 inputs"):
    sj.nn.sparsify_inputs(nnx.clone(model), {"up": {"kernel": jnp.ones(31)}})
  with pytest.raises(ValueError, match=r"thresholds name \['head/kernel'\]"):
    sj.nn.sparsify_inputs(nnx.clone(model), {"head": {"kernel": jnp.ones(32)}})
  with pytest.raises(ValueError, match="model must be a flax nnx Module"):
    sj.nn.sparsify_inputs(thresholds, thresholds)
