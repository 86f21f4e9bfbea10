"""Sharded training on 8 simulated CPU devices equals the single-device run.

The check runs in a subprocess, because the device count is fixed when JAX
starts: ``python tests/sharding_test.py explicit`` (or ``auto``) trains every
method of the contract registry with params, batches and masks sharded over a
(data=2, model=4) mesh and compares with the same run on one device.
"""

import os
import subprocess
import sys

if __name__ == "__main__":  # before JAX starts
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

import sparsejax as sj  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
# One registry entry per method (the other entries vary distributions and
# estimators, which shard the same way).
FAMILIES = ("static_random_erk", "magnitude_global", "snip_global", "set_erk", "rigl_block",
            "granet_dense_to_sparse", "n_m_sr_ste", "srigl")


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


def main(mode, names):
  axis_type = jax.sharding.AxisType.Explicit if mode == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  data = list(batches(6))
  for name in names:
    make = lambda: sj.sparsify(optax.adam(1e-2), METHODS[name].make())  # noqa: E731
    single, single_state = train(make(), make_params(), data)
    with jax.set_mesh(mesh):
      params = make_params()
      shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)
      sharded, state = train(make(), jax.device_put(params, shardings), data,
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


@pytest.mark.parametrize("mode, names", [
    ("explicit", ",".join(FAMILIES)),
    ("auto", "static_random_erk,rigl_block,n_m_sr_ste"),
])
def test_sharded_training_equals_single_device(mode, names):
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, "sharding_test.py"), mode, names],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert result.stdout.count(": ok") == len(names.split(","))


sys.path.insert(0, HERE)
from contract_test import METHODS, batches, loss_fn, make_params  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].split(","))
