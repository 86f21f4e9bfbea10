"""Exact top-k: the searched path must equal a stable descending argsort."""

import zlib

import jax
import jax.numpy as jnp
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax._src import topk


def reference_mask(scores, k):
  """First k of a stable descending sort; NaN lowest, -0.0 and subnormals equal to 0.0."""
  s = np.asarray(scores, np.float64).reshape(-1)
  s = np.where(np.isnan(s), -np.inf, np.where(np.abs(s) < np.finfo(np.float32).tiny, 0.0, s))
  order = np.lexsort((np.arange(s.size), -s))
  mask = np.zeros(s.size, bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(scores))


def make_scores(kind, shape, rng):
  s = rng.standard_normal(shape).astype(np.float32)
  if kind == "ties":
    s = np.round(s * 2)
  elif kind == "masked":  # most entries inactive, as magnitude scores are
    s[rng.random(shape) < 0.7] = -np.inf
  elif kind == "nan":
    s[rng.random(shape) < 0.2] = np.nan
  elif kind == "constant":
    s[...] = 1.5
  elif kind == "signed_zeros":
    s = np.where(rng.random(shape) < 0.5, -0.0, 0.0).astype(np.float32)
  elif kind == "wide":
    s = np.exp(8 * s)
  return s


KINDS = ["normal", "ties", "masked", "nan", "constant", "signed_zeros", "wide"]


# Called only while SORT_MAX_SIZE = 0 (the `searched` fixture, the property
# test), so every trace takes the searched path; tests of a shape already seen
# reuse its compile.
_searched_only = jax.jit(lambda s, k: topk.topk_mask(s, k))


@pytest.fixture
def searched(monkeypatch):
  """topk_mask forced onto the search path, even for small arrays."""
  monkeypatch.setattr(topk, "SORT_MAX_SIZE", 0)
  return _searched_only


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 5), (4, 6, 50)])
def test_searched_topk_equals_stable_argsort(searched, kind, shape):
  rng = np.random.default_rng(zlib.crc32(repr((kind, shape)).encode()))
  s = make_scores(kind, shape, rng)
  n = s.size
  for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
    mask = np.asarray(searched(s, k))
    assert mask.shape == s.shape and mask.dtype == bool
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, reference_mask(s, k))


@pytest.mark.parametrize("kind", KINDS)
def test_sorted_topk_equals_stable_argsort(kind):
  rng = np.random.default_rng(7)
  s = make_scores(kind, (40, 25), rng)
  f = jax.jit(sj.topk_mask)
  for k in [0, 1, 500, 999, 1000]:
    np.testing.assert_array_equal(np.asarray(f(s, k)), reference_mask(s, k))


@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
def test_large_leaf_uses_search_and_is_exact(kind):
  rng = np.random.default_rng(3)
  s = make_scores(kind, (300, 301), rng)  # above SORT_MAX_SIZE
  assert s.size > topk.SORT_MAX_SIZE
  f = jax.jit(sj.topk_mask)
  for k in [1, 9030, 45150, 90299]:
    np.testing.assert_array_equal(np.asarray(f(s, k)), reference_mask(s, k))


def test_k_is_clipped_and_traceable():
  s = jnp.arange(10.0)
  assert int(sj.topk_mask(s, -3).sum()) == 0
  assert int(sj.topk_mask(s, 99).sum()) == 10
  ks = jnp.arange(11)
  counts = jax.vmap(lambda k: sj.topk_mask(s, k).sum())(ks)
  np.testing.assert_array_equal(np.asarray(counts), np.arange(11))


def reference_global_counts(scores, total, floors):
  flat = [np.where(np.isnan(s), -np.inf, np.asarray(s, np.float64)).reshape(-1) for s in scores]
  floors = list(floors)
  for i in reversed(range(len(floors))):  # floors above the total give back, last first
    give = min(max(sum(floors) - total, 0), floors[i])
    floors[i] -= give
  if sum(floors) >= total:
    return floors
  count = lambda t, strict=False: sum(
      max(int(np.sum(s > t) if strict else np.sum(s >= t)), f) for s, f in zip(flat, floors))
  values = np.unique(np.concatenate(flat))[::-1]
  t = next(v for v in values if count(v) >= total)
  above = [max(int(np.sum(s > t)), f) for s, f in zip(flat, floors)]
  at = [max(int(np.sum(s >= t)), f) for s, f in zip(flat, floors)]
  left = total - sum(above)
  out = []
  for a, b in zip(above, at):
    take = min(left, b - a)
    out.append(a + take)
    left -= take
  return out


@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
@pytest.mark.parametrize("floor", [0, 3, 20])
def test_global_counts_match_reference(kind, floor):
  rng = np.random.default_rng(11)
  scores = [make_scores(kind, shape, rng) * scale
            for shape, scale in [((8, 12), 1.0), ((30,), 0.1), ((5, 5, 4), 3.0)]]
  n_all = sum(s.size for s in scores)
  f = jax.jit(topk.global_counts)
  for total in [1, n_all // 10, n_all // 2, n_all - 1]:
    floors = [min(floor, s.size) for s in scores]
    got = [int(c) for c in f(scores, total, floors)]
    want = reference_global_counts(scores, total, floors)
    assert got == want, (total, floors)
    assert sum(got) == total
    # The masks cut at the shared threshold are each leaf's own top-k.
    masks = jax.jit(topk.global_masks)(scores, total, floors)
    for mask, score, k in zip(masks, scores, want):
      np.testing.assert_array_equal(np.asarray(mask), reference_mask(score, k))


def test_subnormal_scores_count_as_zero_on_both_paths(searched):
  s = np.zeros(1000, np.float32)
  s[-10:] = 1e-40  # subnormal: XLA's CPU comparisons flush these to zero
  want = reference_mask(s, 10)
  assert want[:10].all()  # ties with the zeros, so the first ten win
  np.testing.assert_array_equal(np.asarray(searched(s, 10)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(sj.topk_mask)(s, 10)), want)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
                      elements=st.sampled_from([-np.inf, -2.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.nan])
                      | st.floats(-1e3, 1e3, width=32)),
    fraction=st.floats(0.0, 1.0))
def test_search_equals_argsort_property(values, fraction):
  k = int(round(fraction * values.size))
  original = topk.SORT_MAX_SIZE
  topk.SORT_MAX_SIZE = 0  # force the searched path (read when a shape is first traced)
  try:
    mask = np.asarray(_searched_only(values, k))
  finally:
    topk.SORT_MAX_SIZE = original
  np.testing.assert_array_equal(mask, reference_mask(values, k))
