"""Orbax checkpoints of the full sparse training state resume bit-identically."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sparsejax as sj
from contract_test import METHODS, batches, loss_fn, make_params

# The state kinds: plain masks, DST state with keys, N:M shadow weights, SRigL budgets.
KINDS = ("magnitude_global", "rigl_block", "n_m_sr_ste", "srigl")


def make_step(tx):
  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


@pytest.mark.parametrize("name", KINDS)
def test_interrupted_run_resumes_bit_identically(name, tmp_path):
  tx = sj.sparsify(optax.adam(1e-2), METHODS[name].make())
  step = make_step(tx)
  data = list(batches(10))
  # Committed to the device as restored arrays are, so the resumed steps run
  # the same compiled step (uncommitted inputs would compile it again).
  start = lambda: jax.device_put(  # noqa: E731
      (make_params(), jax.jit(tx.init)(make_params())), jax.devices()[0])

  params, state = start()
  for batch in data:
    params, state = step(params, state, batch)
  uninterrupted = {"params": params, "opt_state": state}

  params, state = start()
  for batch in data[:5]:
    params, state = step(params, state, batch)
  with ocp.StandardCheckpointer() as checkpointer:  # typed PRNG keys and None leaves too
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  del params, state

  # A fresh process knows only the shapes: restore into them.
  abstract = jax.eval_shape(lambda: {"params": make_params(),
                                     "opt_state": tx.init(make_params())})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  params, state = restored["params"], restored["opt_state"]
  assert int(state.count) == 5
  for batch in data[5:]:
    params, state = step(params, state, batch)

  resumed = {"params": params, "opt_state": state}
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-identical
  assert sum(int(m.sum()) for m in jax.tree.leaves(sj.get_masks(state))) < sum(
      p.size for p in jax.tree.leaves(params))  # something is pruned

