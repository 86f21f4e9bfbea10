r"""An ensemble of N sparse models in one `jax.vmap`-ed train step against N single steps.

Each configuration trains the same MLP on one fixed batch: one model with
`jax.jit(step)`, and N models (different initializations) with
`jax.jit(jax.vmap(step))`. Time is taken over whole mask-update cycles
(`--update_every` steps, one mask update included), rounds interleave one
model and the ensemble, and the median round is reported as the ensemble's
time ÷ (N × one model's). The target (issue 18): at most 1.2.

  python benchmarks/ensemble.py                   # MLP 784-1024x3-10, batch 128
  python benchmarks/ensemble.py --members=2,4 --methods=rigl
"""

from absl import app
from absl import flags
import jax
import numpy as np
import optax

import sparsejax as sj
from _common import mlp_loss, mlp_params, timed_rounds  # pylint: disable=g-multiple-import

_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Width of the hidden layers.")
_LAYERS = flags.DEFINE_integer("layers", 3, "Number of hidden layers.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_MEMBERS = flags.DEFINE_list("members", ["2", "4"], "Ensemble sizes N.")
_METHODS = flags.DEFINE_list("methods", ["static", "magnitude", "rigl"], "Sparsity methods.")
_UPDATE_EVERY = flags.DEFINE_integer("update_every", 100, "Steps between mask updates.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (median).")
TARGET = 1.2

_IN, _OUT = 784, 10


def method(name, every):
  key = jax.random.key(0)
  return {"static": lambda: sj.static_random(0.9, key=key),
          "magnitude": lambda: sj.magnitude(0.9, update_every=every),
          "rigl": lambda: sj.rigl(0.9, update_every=every, end_step=10 * every, key=key)}[name]()


def cycle(step, every):
  """`every` train steps in a row (one mask-update cycle), to completion."""
  def run(params, state, x, y):
    for _ in range(every):
      params, state = step(params, state, x, y)
    return jax.block_until_ready(params)
  return run


def main(argv):
  del argv
  every, sizes = _UPDATE_EVERY.value, [_IN] + [_HIDDEN.value] * _LAYERS.value + [_OUT]
  x = jax.random.normal(jax.random.key(1), (_BATCH.value, _IN))
  y = np.arange(_BATCH.value) % _OUT
  n_params = sum(p.size for p in jax.tree.leaves(mlp_params(jax.random.key(0), sizes)))
  print(f"{jax.default_backend()}, jax {jax.__version__}; MLP {'-'.join(map(str, sizes))} "
        f"({n_params / 1e6:.1f}M params), batch {_BATCH.value}, adam, 90% sparsity, a mask "
        f"update every {every} steps; median of {_ROUNDS.value} rounds of {every} steps\n")
  print(f"{'method':<10} {'N':>3} {'one ms/step':>12} {'ensemble ms/step':>17} "
        f"{'ens ÷ (N x one)':>16}")
  for name in _METHODS.value:
    tx = sj.sparsify(optax.adam(1e-3), method(name, every))

    def step(params, state, x, y, tx=tx):
      updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    one = jax.jit(step)
    ensemble = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)))
    params = mlp_params(jax.random.key(0), sizes)
    for n in map(int, _MEMBERS.value):
      keys = jax.random.split(jax.random.key(0), n)
      members = jax.vmap(lambda k: mlp_params(k, sizes))(keys)
      (t_one, e_one), (t_ens, e_ens) = timed_rounds(
          [(cycle(one, every), (params, tx.init(params), x, y)),
           (cycle(ensemble, every), (members, jax.vmap(tx.init)(members), x, y))],
          repeats=_ROUNDS.value)
      if t_one is None or t_ens is None:
        print(f"{name:<10} {n:>3}  failed: {e_one or e_ens}")
        continue
      ratio = t_ens / (n * t_one)
      print(f"{name:<10} {n:>3} {1e3 * t_one / every:12.3f} {1e3 * t_ens / every:17.3f} "
            f"{ratio:15.2f}x  {'met' if ratio <= TARGET else 'NOT met'} (<= {TARGET})",
            flush=True)


if __name__ == "__main__":
  app.run(main)
