"""Ensembles: `jax.vmap` of a whole sparse train step over several models."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

MEMBERS = 3


def make_params(key):
  k1, k2 = jax.random.split(key)
  return {"hidden": {"kernel": jax.random.normal(k1, (16, 32)) / 4, "bias": jnp.zeros(32)},
          "out": {"kernel": jax.random.normal(k2, (32, 4)) / 6}}


def loss(params, x, y):
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"][None])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"]["kernel"], y).mean()


def batch(i):
  x = jax.random.normal(jax.random.key(100 + i), (32, 16))
  return x, jnp.arange(32) % 4


def counting(method, calls):
  """`method` whose update reports each run of it (per member) to `calls`."""
  def update(masks, state, params, grads, step):
    jax.debug.callback(lambda s: calls.append(int(s)), step)
    return method.update(masks, state, params, grads, step)
  return method._replace(update=update)


@functools.cache
def stepper(tx, ensemble):
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)) if ensemble else step)


def train(tx, steps, params, state, *, ensemble=False):
  run = stepper(tx, ensemble)
  for i in range(steps):
    params, state = run(params, state, *batch(i))
  return params, state


METHODS = {
    "rigl": lambda: sj.rigl(0.8, update_every=4, end_step=40, key=jax.random.key(7)),
    "magnitude": lambda: sj.magnitude(sj.cubic_schedule(0.8, begin_step=0, end_step=8),
                                      update_every=2),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_member_equals_its_own_run_and_updates_run_only_at_update_steps(name):
  calls = []
  tx = sj.sparsify(optax.adam(1e-2), counting(METHODS[name](), calls))
  keys = jax.random.split(jax.random.key(0), MEMBERS)
  params = jax.vmap(make_params)(keys)
  params, state = train(tx, 12, params, jax.vmap(tx.init)(params), ensemble=True)
  jax.effects_barrier()  # every callback has run
  updates_per_member = len(set(calls))
  # A vmapped lax.cond would run the update at all 12 steps for every member.
  assert 0 < updates_per_member < 12 and len(calls) == MEMBERS * updates_per_member, calls
  for m in range(MEMBERS):
    p = make_params(keys[m])
    alone, alone_state = train(tx, 12, p, tx.init(p))
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(params)):
      np.testing.assert_allclose(b[m], a, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(sj.get_masks(alone_state)),
                    jax.tree.leaves(sj.get_masks(state))):
      np.testing.assert_array_equal(b[m], a)
    kernel = params["hidden"]["kernel"][m]
    assert np.all(np.asarray(kernel)[~np.asarray(sj.get_masks(state)["hidden"]["kernel"][m])] == 0)


def test_members_at_different_steps_each_update_on_their_own_schedule():
  # Member 1 starts one step later: its updates fall on other steps than member 0's.
  tx = sj.sparsify(optax.sgd(0.1), METHODS["rigl"]())
  keys = jax.random.split(jax.random.key(0), 2)
  params = jax.vmap(make_params)(keys)
  state = jax.vmap(tx.init)(params)
  state = state._replace(count=jnp.array([0, 1], jnp.int32))
  params, state = train(tx, 9, params, state, ensemble=True)
  for m, offset in enumerate([0, 1]):
    p = make_params(keys[m])
    s = tx.init(p)._replace(count=jnp.int32(offset))
    alone, alone_state = train(tx, 9, p, s)
    for a, b in zip(jax.tree.leaves(sj.get_masks(alone_state)),
                    jax.tree.leaves(sj.get_masks(state))):
      np.testing.assert_array_equal(b[m], a)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(params)):
      np.testing.assert_allclose(b[m], a, rtol=1e-5, atol=1e-6)


def test_gradients_pass_through_the_update_to_the_inner_optimizer():
  # Differentiating through tx.update (a learned learning rate, say) still works:
  # the mask update takes no gradient, the optimizer step does.
  tx = sj.sparsify(optax.sgd(0.1), METHODS["rigl"]())
  p = make_params(jax.random.key(0))
  state = tx.init(p)

  def after(scale):
    grads = jax.tree.map(lambda g: scale * g, jax.grad(loss)(p, *batch(0)))
    updates, _ = tx.update(grads, state, p)
    return loss(optax.apply_updates(p, updates), *batch(1))

  d = jax.jit(jax.grad(after))(1.0)
  eps = 1e-3
  numeric = (after(1.0 + eps) - after(1.0 - eps)) / (2 * eps)
  assert float(d) != 0 and abs(float(d) - float(numeric)) < 1e-2 * abs(float(numeric)) + 1e-4


def test_ensemble_benchmark_runs_at_a_tiny_size():
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "ensemble.py", "--hidden=16", "--layers=1", "--batch=8",
       "--update_every=2", "--members=2", "--methods=rigl", "--rounds=1"],
      capture_output=True, text=True, timeout=300, cwd=root / "benchmarks",
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  row = [l for l in result.stdout.splitlines() if l.startswith("rigl")]
  assert len(row) == 1 and "x" in row[0].split()[4], result.stdout
