"""Structured units: blocks and channels are entirely on or off, counts are in units."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax import matmul as sjm


def normal(seed, shape):
  """Host random values: jax.random.normal would compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_block_topk_keeps_blocks_with_largest_mean():
  w = jnp.zeros((4, 6)).at[0:2, 2:4].set(5.0).at[2:4, 4:6].set(3.0).at[0:2, 0:2].set(-9.0)
  masks = sj.masks_from_scores({"w": jnp.abs(w)}, 4 / 6, granularity=sj.Block((2, 2)), distribution="uniform")  # 2 of 6 blocks
  expected = np.zeros((4, 6), bool)
  expected[0:2, 0:2] = expected[0:2, 2:4] = True  # |-9| and 5 beat 3
  np.testing.assert_array_equal(masks["w"], expected)
  np.testing.assert_array_equal(sjm.block_layout(masks["w"], (2, 2)),
                                [[True, True, False], [False, False, False]])


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_block_counts_are_exact_in_units(reduce):
  params = {"a": normal(0, (32, 48)),
            "b": normal(1, (3, 3, 16, 32))}
  masks = sj.init_masks(params, 0.7, distribution="erk", key=jax.random.key(2), granularity=sj.Block((8, 16), reduce))
  densities = sj.ERK().densities([(32, 48), (3, 3, 16, 32)], 0.7)
  for (name, m), density, units in zip(masks.items(), densities, [12, 3 * 3 * 2 * 2]):
    layout = np.asarray(sjm.block_layout(m, (8, 16)))
    assert int(m.sum()) == int(layout.sum()) * 8 * 16, name
    assert int(layout.sum()) == int(np.round(np.float32(density) * np.float32(units))), name


def test_channel_masks_whole_columns():
  w = jax.random.normal(jax.random.key(0), (10, 8)) * jnp.arange(1.0, 9.0)[None]
  masks = sj.masks_from_scores({"w": jnp.abs(w)}, 0.5, granularity=sj.Channel(axis=-1), distribution="uniform")
  columns = np.asarray(masks["w"]).all(axis=0) | ~np.asarray(masks["w"]).any(axis=0)
  assert columns.all()  # every column entirely on or off
  np.testing.assert_array_equal(np.asarray(masks["w"])[0], [False] * 4 + [True] * 4)


def test_magnitude_with_blocks_trains_with_exact_blocks():
  params = {"w": normal(0, (16, 32))}
  tx = sj.sparsify(optax.adam(1e-2), sj.magnitude(0.75, update_every=2, granularity=sj.Block((4, 8))))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(6):
    grads = {"w": normal(i, (16, 32))}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    layout = sjm.block_layout(sj.get_masks(state)["w"], (4, 8))  # raises if a tile is mixed
    assert int(layout.sum()) == 4
    assert np.all(np.asarray(params["w"])[~np.asarray(sj.get_masks(state)["w"])] == 0)


def test_granularity_bad_input():
  params = {"dense": {"kernel": jnp.ones((10, 12))}}
  with pytest.raises(ValueError, match=re.escape(
      "block_shape=(4, 4) does not divide params['dense']['kernel'] of shape (10, 12)")):
    sj.init_masks(params, 0.5, key=jax.random.key(0), granularity=sj.Block((4, 4)))
  with pytest.raises(ValueError, match="fewer dims than block_shape"):
    sj.init_masks(params, 0.5, key=jax.random.key(0), granularity=sj.Block((2, 2, 2)))
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    sj.init_masks(params, 0.5, key=jax.random.key(0), granularity=sj.Channel(2))
  with pytest.raises(ValueError, match="block_shape=.* must be a tuple of integers"):
    sj.Block((0, 4))
  with pytest.raises(ValueError, match="reduce='median'"):
    sj.Block((2, 2), reduce="median")
  with pytest.raises(ValueError, match="granularity must be None"):
    sj.magnitude(0.5, granularity=(4, 4))
  with pytest.raises(ValueError, match="not block-structured"):
    sjm.block_layout(jnp.eye(4, dtype=bool), (2, 2))
