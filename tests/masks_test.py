"""Masks paired with params: apply, create, inspect, and what happens on bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "dense": {"kernel": jax.random.normal(k[0], (4, 8)), "bias": jnp.ones(8)},
      "conv": {"kernel": jax.random.normal(k[1], (3, 3, 2, 4))},
      "step": jnp.zeros((2, 2), jnp.int32),
  }


def test_init_masks_default_where_and_exact_counts():
  masks = jax.jit(lambda p, k: sj.init_masks(p, 0.75, key=k, distribution="uniform"))(params(), jax.random.key(1))
  assert masks["dense"]["bias"] is None and masks["step"] is None
  assert masks["dense"]["kernel"].dtype == jnp.bool_
  assert int(masks["dense"]["kernel"].sum()) == 8
  assert int(masks["conv"]["kernel"].sum()) == 18


def test_init_masks_is_reproducible_from_key():
  a = sj.init_masks(params(), 0.5, key=jax.random.key(3))
  b = sj.init_masks(params(), 0.5, key=jax.random.key(3))
  c = sj.init_masks(params(), 0.5, key=jax.random.key(4))
  np.testing.assert_array_equal(a["dense"]["kernel"], b["dense"]["kernel"])
  assert not np.array_equal(a["dense"]["kernel"], c["dense"]["kernel"])


def test_apply_masks_zeroes_pruned_and_keeps_dense_leaves():
  p = params()
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0), where="kernel")
  out = jax.jit(sj.apply_masks)(p, masks)
  kernel, mask = np.asarray(out["dense"]["kernel"]), np.asarray(masks["dense"]["kernel"])
  assert np.all(kernel[~mask] == 0)
  np.testing.assert_array_equal(kernel[mask], np.asarray(p["dense"]["kernel"])[mask])
  np.testing.assert_array_equal(out["dense"]["bias"], p["dense"]["bias"])
  assert out["step"].dtype == jnp.int32


def test_where_patterns_and_callables():
  p = params()
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0), where=r"^conv/")
  assert masks["dense"]["kernel"] is None and masks["conv"]["kernel"] is not None
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0), where=["dense/bias", "conv"])
  assert masks["dense"]["bias"] is not None and masks["dense"]["kernel"] is None
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0), where=lambda path, leaf: leaf.ndim == 4)
  assert masks["conv"]["kernel"] is not None and masks["dense"]["kernel"] is None


def test_summary_table():
  p = params()
  masks = sj.init_masks(p, 0.75, key=jax.random.key(0), distribution="uniform")
  table = sj.summary(sj.apply_masks(p, masks), masks)
  row = next(line for line in table.splitlines() if line.startswith("dense/kernel"))
  assert row.split()[-4:] == ["32", "8", "0.2500", "sparse"]
  assert re.search(r"total \(sparsified leaves\)\s+104\s+26\s+0.2500", table)
  assert "dense/bias" in table and "dense" in table.splitlines()[3]


def test_where_matching_nothing():
  with pytest.raises(ValueError, match="where matches no leaf of params.*dense/kernel"):
    sj.init_masks(params(), 0.5, key=jax.random.key(0), where="decoder")
  with pytest.raises(ValueError, match="where matches no leaf"):
    sj.sparsify(optax.sgd(0.1), sj.magnitude(0.5), where="decoder").init(params())


def test_where_selecting_integer_leaf():
  with pytest.raises(ValueError, match=r"params\['step'\] of dtype int32"):
    sj.init_masks(params(), 0.5, key=jax.random.key(0), where="step")


def test_bad_where_type():
  with pytest.raises(ValueError, match="where must be None, a callable"):
    sj.init_masks(params(), 0.5, key=jax.random.key(0), where=3)


def test_masks_with_wrong_shape():
  p = params()
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0))
  masks["dense"]["kernel"] = jnp.ones((4, 4), bool)
  with pytest.raises(ValueError, match=re.escape(
      "params['dense']['kernel']: mask shape (4, 4) != param shape (4, 8)")):
    sj.apply_masks(p, masks)


def test_masks_with_wrong_structure_or_dtype():
  p = params()
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0))
  del masks["conv"]
  with pytest.raises(ValueError, match=r"leaves missing from masks: \['conv/kernel'\]"):
    sj.apply_masks(p, masks)
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0))
  masks["dense"]["kernel"] = masks["dense"]["kernel"].astype(jnp.float32)
  with pytest.raises(ValueError, match=r"params\['dense'\]\['kernel'\]: mask dtype float32 != bool"):
    sj.apply_masks(p, masks)


def test_sparsity_out_of_range():
  for bad in [-0.1, 1.0, 1.5]:
    with pytest.raises(ValueError, match=rf"sparsity={bad} must lie in \[0, 1\)"):
      sj.init_masks(params(), bad, key=jax.random.key(0))


def test_none_leaves_in_params():
  p = {"w": jnp.arange(16.0).reshape(4, 4), "unused": None, "pair": (jnp.ones(3), None)}
  tx = sj.sparsify(optax.adam(0.1), sj.magnitude(0.5))
  state = tx.init(p)
  masks = sj.get_masks(state)
  assert masks["unused"] is None and masks["pair"] == (None, None)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), state, p)
  out = optax.apply_updates(p, updates)
  assert out["unused"] is None
  np.testing.assert_array_equal(np.asarray(out["w"])[:2], 0.0)  # the 8 smallest
  assert "pair/0" in sj.summary(out, masks)


def test_scalar_leaves_and_bad_patterns():
  p = {"w": jnp.ones((4, 4)), "temperature": 1.0}
  masks = sj.init_masks(p, 0.5, key=jax.random.key(0))
  assert masks["temperature"] is None and int(masks["w"].sum()) == 8
  with pytest.raises(ValueError, match=r"where: '\(kernel' is not a valid regular expression"):
    sj.init_masks(p, 0.5, key=jax.random.key(0), where="(kernel")
