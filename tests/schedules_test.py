import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj


def test_polynomial_schedule_values():
  schedule = jax.jit(sj.polynomial_schedule(0.1, 0.9, begin_step=100, end_step=1100, power=3))
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(100)) == pytest.approx(0.1)
  # Zhu & Gupta: s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3
  assert float(schedule(600)) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3, rel=1e-6)
  assert float(schedule(1100)) == pytest.approx(0.9)
  assert float(schedule(5000)) == pytest.approx(0.9)


def test_polynomial_schedule_is_monotone_and_begin_equals_end():
  schedule = sj.polynomial_schedule(0.0, 0.8, begin_step=10, end_step=50)
  values = np.array([float(schedule(t)) for t in range(0, 70)])
  assert np.all(np.diff(values) >= 0)
  step = sj.polynomial_schedule(0.0, 0.5, begin_step=7, end_step=7)
  assert float(step(6)) == 0.0 and float(step(7)) == pytest.approx(0.5)


def test_one_shot():
  schedule = jax.jit(sj.one_shot(0.75, step=3))
  assert [float(schedule(t)) for t in range(5)] == [0.0, 0.0, 0.0, 0.75, 0.75]


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_sparsity=-0.1, final_sparsity=0.5, begin_step=0, end_step=10), "init_sparsity"),
    (dict(init_sparsity=0.0, final_sparsity=1.0, begin_step=0, end_step=10), "final_sparsity"),
    (dict(init_sparsity=0.0, final_sparsity=0.5, begin_step=10, end_step=5), "end_step"),
    (dict(init_sparsity=0.0, final_sparsity=0.5, begin_step=-1, end_step=5), "begin_step"),
    (dict(init_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=5, power=0.0), "power"),
])
def test_polynomial_schedule_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sj.polynomial_schedule(**kwargs)


def test_one_shot_bad_input():
  with pytest.raises(ValueError, match=r"sparsity=1.0 must lie in \[0, 1\)"):
    sj.one_shot(1.0)
  with pytest.raises(ValueError, match="step"):
    sj.one_shot(0.5, step=-3)


def test_schedule_is_traceable_in_step():
  schedule = sj.polynomial_schedule(0.0, 0.9, begin_step=0, end_step=10)
  values = jax.vmap(schedule)(jnp.arange(12))
  assert values.shape == (12,) and values.dtype == jnp.float32
