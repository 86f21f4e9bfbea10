"""How a global sparsity is split over leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src import distributions


def rigl_erk_densities(shapes, sparsity, power_scale=1.0):
  """ERK as the RigL paper's code computes it: grow a dense set until eps is valid."""
  dense = set()
  while True:
    divisor, rhs, raw = 0.0, 0.0, {}
    for i, shape in enumerate(shapes):
      n = np.prod(shape)
      if i in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1 - sparsity)
        raw[i] = (np.sum(shape) / np.prod(shape)) ** power_scale
        divisor += raw[i] * n
    eps = rhs / divisor
    biggest = max(raw.values())
    if eps * biggest > 1:
      dense |= {i for i, r in raw.items() if r == biggest}
    else:
      return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def test_erk_hand_computed():
  # raw = (10+10)/100 = 0.2 and (10+100)/1000 = 0.11; kept = 550;
  # eps = 550 / (0.2*100 + 0.11*1000) = 550/130.
  d = sj.ERK().densities([(10, 10), (10, 100)], 0.5)
  assert float(d[0]) == pytest.approx(0.2 * 550 / 130, rel=1e-6)
  assert float(d[1]) == pytest.approx(0.11 * 550 / 130, rel=1e-6)


def test_erk_redensifies_small_leaves():
  # raw = 1 and 0.02: eps = 5002/204 > 1, so the (2, 2) leaf is made dense and
  # the big one keeps (5002 - 4) of its 10000 entries.
  d = sj.ERK().densities([(2, 2), (100, 100)], 0.5)
  assert float(d[0]) == 1.0
  assert float(d[1]) == pytest.approx(4998 / 10000, rel=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("power_scale", [0.0, 0.5, 1.0])
def test_erk_matches_rigl_algorithm(sparsity, power_scale):
  shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (512, 64), (64, 10), (10, 10)]
  got = jax.jit(lambda s: sj.ERK(power_scale=power_scale).densities(shapes, s))(sparsity)
  want = rigl_erk_densities(shapes, sparsity, power_scale)
  np.testing.assert_allclose([float(g) for g in got], want, rtol=2e-5)
  kept = sum(float(g) * np.prod(s) for g, s in zip(got, shapes))
  assert kept == pytest.approx((1 - sparsity) * sum(np.prod(s) for s in shapes), rel=1e-5)


def _scores(shapes, seed=0):
  """Host random values: jax.random.normal would compile for every new shape."""
  rng = np.random.default_rng(seed)
  return {f"layer{i}": jnp.asarray(rng.standard_normal(s, np.float32))
          for i, s in enumerate(shapes)}


def test_uniform_counts_are_exact():
  scores = _scores([(13, 17), (40, 3), (7,)])
  masks = jax.jit(lambda s: sj.masks_from_scores(s, 0.7, distribution="uniform"))(scores)
  for name, m in masks.items():
    kept = int(np.round(np.float32(1 - np.float32(0.7)) * np.float32(m.size)))
    assert int(m.sum()) == kept, name


def test_topk_masks_keeps_largest_and_none_leaves():
  scores = {"a": jnp.array([[3.0, -1.0], [0.5, 2.0]]), "b": None}
  masks = sj.masks_from_scores(scores, 0.5, distribution="uniform")
  assert masks["b"] is None
  np.testing.assert_array_equal(masks["a"], [[True, False], [False, True]])


def test_global_keeps_exact_total_and_floor_at_99_percent():
  # One leaf with tiny scores would vanish under a pure global threshold.
  scores = _scores([(64, 64), (64, 32), (32, 10)])
  scores["layer2"] = scores["layer2"] * 1e-3
  n = sum(s.size for s in scores.values())
  total = int(np.round(np.float32(1 - np.float32(0.99)) * np.float32(n)))
  pure = sj.masks_from_scores(scores, 0.99, distribution=sj.Global())
  assert int(pure["layer2"].sum()) == 0
  assert sum(int(m.sum()) for m in pure.values()) == total
  floored = jax.jit(lambda s: sj.masks_from_scores(s, 0.99, distribution=sj.Global(min_density=0.005)))(scores)
  assert sum(int(m.sum()) for m in floored.values()) == total
  for name, m in floored.items():
    assert int(m.sum()) / m.size >= 0.005, name


def test_global_selects_largest_scores_overall():
  scores = {"a": jnp.array([5.0, 1.0, 0.0]), "b": jnp.array([4.0, 3.0, 2.0, -1.0])}
  masks = sj.masks_from_scores(scores, 4 / 7 + 1e-6, distribution="global")  # keep 3 of 7
  np.testing.assert_array_equal(masks["a"], [True, False, False])
  np.testing.assert_array_equal(masks["b"], [True, True, False, False])


@pytest.mark.parametrize("distribution", [sj.Uniform, sj.ERK, sj.Global])
def test_overrides_fix_leaf_sparsity(distribution):
  scores = _scores([(20, 20), (30, 10), (10, 5)])
  dist = distribution(overrides={"layer1": 0.0, "layer2$": 0.5})
  masks = sj.masks_from_scores(scores, 0.9, distribution=dist)
  assert int(masks["layer1"].sum()) == 300
  assert int(masks["layer2"].sum()) == 25
  # The rest of the target applies to the pool of other leaves.
  assert int(masks["layer0"].sum()) == 40


def test_distribution_bad_input():
  with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
    sj.magnitude(0.5, distribution="erdos")
  with pytest.raises(ValueError, match=r"min_density=1.5 must lie in \[0, 1\]"):
    sj.Global(min_density=1.5)
  with pytest.raises(ValueError, match="power_scale"):
    sj.ERK(power_scale=-1.0)
  with pytest.raises(ValueError, match=r"overrides\['head'\]=1.2"):
    sj.Uniform(overrides={"head": 1.2})
  with pytest.raises(ValueError, match="matches no sparsified leaf"):
    sj.masks_from_scores(_scores([(4, 4)]), 0.5, distribution=sj.Uniform(overrides={"decoder": 0.1}))
  with pytest.raises(ValueError, match=r"scores\['a'\]: scores must be floating"):
    sj.masks_from_scores({"a": jnp.arange(4)}, 0.5, distribution="uniform")


def test_kept_counts_are_exact_at_the_ends_for_huge_leaves():
  n = 2**24 + 1  # not representable in float32
  assert int(distributions.kept(jnp.float32(1.0), n)) == n
  assert int(distributions.kept(jnp.float32(0.0), n)) == 0


def test_erk_equals_uniform_when_ratios_are_equal():
  for sparsity in np.linspace(0.0, 0.95, 39):
    scores = _scores([(3, 5), (5, 3)])
    erk = sj.masks_from_scores(scores, float(sparsity), distribution="erk")
    uniform = sj.masks_from_scores(scores, float(sparsity), distribution="uniform")
    assert [int(m.sum()) for m in erk.values()] == [int(m.sum()) for m in uniform.values()]


def test_global_floor_is_floor_of_min_density_or_global_density():
  scores = jax.tree.map(jnp.abs, _scores([(64,), (1000,)]))
  scores["layer0"] = scores["layer0"] * 1e-6  # would lose everything to a pure threshold
  assert int(sj.masks_from_scores(scores, 0.5, distribution=sj.Global())["layer0"].sum()) == 0
  masks = sj.masks_from_scores(scores, 0.5, distribution=sj.Global(min_density=0.5))
  assert int(masks["layer0"].sum()) == 32
  masks = sj.masks_from_scores(scores, 0.5, distribution=sj.Global(min_density=0.3))
  assert int(masks["layer0"].sum()) == 20  # ceil(0.3 * 64)
  assert sum(int(m.sum()) for m in masks.values()) == 532
  masks = sj.masks_from_scores({"a": scores["layer0"][:50] * 0 + 1e-9, "b": scores["layer1"]}, 0.5, distribution=sj.Global(min_density=0.3))
  assert int(masks["a"].sum()) == 15  # exactly 0.3 * 50, no float overshoot


def test_global_floors_that_overshoot_give_back_the_excess():
  from sparsejax._src import topk  # pylint: disable=g-import-not-at-top
  scores = [jnp.arange(10.0), jnp.arange(10.0)]
  assert [int(c) for c in topk.global_counts(scores, 7, [5, 4])] == [5, 2]


def test_empty_leaves_keep_nothing():
  scores = {"w": jnp.arange(10.0), "empty": jnp.zeros((0, 4))}
  for dist in ["uniform", "erk", "global"]:
    masks = sj.masks_from_scores(scores, 0.5, distribution=dist)
    assert masks["empty"].shape == (0, 4) and int(masks["w"].sum()) == 5


def test_static_distribution_hyperparameters():
  with pytest.raises(ValueError, match="power_scale must be a Python float"):
    sj.ERK(power_scale=jnp.float32(0.5))
  with pytest.raises(ValueError, match="min_density must be a Python float"):
    sj.Global(min_density=jnp.float32(0.1))
  with pytest.raises(ValueError, match=r"overrides: 'dense\[' is not a valid regular expression"):
    sj.Uniform(overrides={"dense[": 0.5})
