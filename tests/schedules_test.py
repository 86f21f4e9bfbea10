import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def test_cubic_schedule_values():
  schedule = jax.jit(sj.cubic_schedule(0.9, init_sparsity=0.1, begin_step=100, end_step=1100))
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(100)) == pytest.approx(0.1)
  # Zhu & Gupta: s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3
  assert float(schedule(600)) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3, rel=1e-6)
  assert float(schedule(1100)) == pytest.approx(0.9)
  assert float(schedule(5000)) == pytest.approx(0.9)


def test_cubic_schedule_is_monotone_and_begin_equals_end():
  schedule = sj.cubic_schedule(0.8, begin_step=10, end_step=50)
  values = np.array([float(schedule(t)) for t in range(0, 70)])
  assert np.all(np.diff(values) >= 0)
  step = sj.cubic_schedule(0.5, begin_step=7, end_step=7)
  assert float(step(6)) == 0.0 and float(step(7)) == pytest.approx(0.5)


def test_one_shot():
  schedule = jax.jit(sj.one_shot(0.75, step=3))
  assert [float(schedule(t)) for t in range(5)] == [0.0, 0.0, 0.0, 0.75, 0.75]


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_sparsity=-0.1, sparsity=0.5, end_step=10), "init_sparsity"),
    (dict(sparsity=1.0, end_step=10), "sparsity=1.0"),
    (dict(sparsity=0.5, begin_step=10, end_step=5), "end_step"),
    (dict(sparsity=0.5, begin_step=-1, end_step=5), "begin_step"),
    (dict(sparsity=0.5, end_step=5, power=0.0), "power"),
    (dict(sparsity=lambda t: 0.5, end_step=5), "sparsity"),
])
def test_cubic_schedule_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sj.cubic_schedule(**kwargs)


def test_one_shot_bad_input():
  with pytest.raises(ValueError, match=r"sparsity=1.0 must lie in \[0, 1\)"):
    sj.one_shot(1.0)
  with pytest.raises(ValueError, match="step"):
    sj.one_shot(0.5, step=-3)


def test_schedule_is_traceable_in_step():
  schedule = sj.cubic_schedule(0.9, end_step=10)
  values = jax.vmap(schedule)(jnp.arange(12))
  assert values.shape == (12,) and values.dtype == jnp.float32


def test_update_steps_is_the_one_rule():
  rule = jax.jit(sj.update_steps(update_every=100, end_step=250))
  assert [t for t in range(401) if rule(t)] == [100, 200, 250]
  offset = sj.update_steps(update_every=3, begin_step=4, end_step=11)
  assert [t for t in range(20) if offset(t)] == [4, 7, 10, 11]
  endless = sj.update_steps(update_every=2)
  assert [t for t in range(7) if endless(t)] == [2, 4, 6]  # never step 0: init sets its masks
  with pytest.raises(ValueError, match="end_step=3 must be >= begin_step=5"):
    sj.update_steps(update_every=1, begin_step=5, end_step=3)


def test_optax_schedules_are_schedules():
  method = sj.magnitude(optax.linear_schedule(0.0, 0.5, 4), update_every=1)
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = sj.sparsify(optax.sgd(0.0), method)
  state = tx.init(params)
  for _ in range(4):
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert int(sj.get_masks(state)["w"].sum()) == 8
