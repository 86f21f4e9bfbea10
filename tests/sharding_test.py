"""Sharded training on 8 simulated CPU devices equals the single-device run.

The check runs in a subprocess, because the device count is fixed when JAX
starts: ``python tests/sharding_test.py`` trains one registry entry of each
method with params, batches and masks sharded over a (data=2, model=4) mesh
of explicit axes (and two of them with automatic axes) and compares with the
same run on one device.
"""

import os
import subprocess
import sys

if __name__ == "__main__":  # before JAX starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

import sparsejax as sj  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))


def make_params(key=0):
  """Two layers (contract_test's model less its middle one, which only adds compile time).

  dense0 splits its output features over 'model'; out (3 features) stays replicated.
  """
  k = jax.random.split(jax.random.key(key), 2)
  return {"dense0": {"kernel": jax.random.normal(k[0], (8, 16)) * 0.5, "bias": jnp.zeros(16)},
          "out": {"kernel": jax.random.normal(k[1], (16, 3)) * 0.3, "bias": jnp.zeros(3)}}


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["dense0"]["kernel"] + params["dense0"]["bias"][None])
  return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"][None] - y) ** 2)


def spec(x):
  """Kernels split their output features over 'model' when they divide."""
  if x.ndim == 2 and x.shape[1] % 4 == 0:
    return P(None, "model")
  if x.ndim == 1 and x.shape[0] % 4 == 0:
    return P("model")
  return P()


def train(tx, params, data, batch_sharding=None):
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  for batch in data:
    if batch_sharding is not None:
      batch = jax.device_put(batch, batch_sharding)
    params, state = step(params, state, batch)
  return params, state


def main(names, auto_names):
  """Trains each method sharded (explicit axes; automatic too for `auto_names`)."""
  data = list(batches(6))
  initial = make_params()  # made once: eager ops under each mesh would compile again
  meshes = {mode: jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
            for mode, axis_type in [("explicit", jax.sharding.AxisType.Explicit),
                                    ("auto", jax.sharding.AxisType.Auto)]}
  for name in names:
    make = lambda: sj.sparsify(optax.adam(1e-2), METHODS[name].make())  # noqa: E731
    single, single_state = train(make(), initial, data)
    for mode in ["explicit", "auto"] if name in auto_names else ["explicit"]:
      mesh = meshes[mode]
      with jax.set_mesh(mesh):
        shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), initial)  # pylint: disable=cell-var-from-loop
        sharded, state = train(make(), jax.device_put(initial, shardings), data,
                               NamedSharding(mesh, P("data")))
      masks, single_masks = sj.get_masks(state), sj.get_masks(single_state)
      for path, mask in jax.tree_util.tree_leaves_with_path(masks):
        param = sharded
        for key in path:
          param = param[key.key]
        if mode == "explicit":  # masks carry their param's sharding
          assert mask.sharding.is_equivalent_to(param.sharding, param.ndim), (name, path)
      for got, want in zip(jax.tree.leaves(masks), jax.tree.leaves(single_masks)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
      for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6,
                                   err_msg=name)
      print(f"{mode} {name}: ok", flush=True)


AUTO = ("static_random_erk", "rigl_block")


def test_sharded_training_equals_single_device():
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, "sharding_test.py")],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert result.stdout.count("explicit ") == len(FAMILIES)
  assert result.stdout.count("auto ") == len(AUTO)
  assert result.stdout.count(": ok") == len(FAMILIES) + len(AUTO)


sys.path.insert(0, HERE)
from contract_test import FAMILIES, METHODS, batches  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  main(FAMILIES, AUTO)
