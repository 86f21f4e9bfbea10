r"""Step time of `sparsify(adam, method)` divided by plain adam, in one process.

Each configuration trains the same MLP on the same fixed batch. Time is taken
over whole mask-update cycles (`--update_every` steps, one mask update
included), rounds interleave the configurations, and the table reports the
median round, so the ratio is amortized over mask updates. A second table
times one mask update on its own against one dense train step.

  python benchmarks/optimizer_overhead.py                 # 11.4M params
  python benchmarks/optimizer_overhead.py --hidden=1024 --layers=3 --batch=128
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from _common import argsort_masks, mlp_loss, mlp_params, timed  # pylint: disable=g-multiple-import

_HIDDEN = flags.DEFINE_integer("hidden", 3000, "Width of the hidden layers.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Number of hidden layers.")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_UPDATE_EVERY = flags.DEFINE_integer("update_every", 100, "Steps between mask updates.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per configuration.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.9, "Sparsity of the sparsified leaves.")

_IN, _OUT = 784, 10


def make_step(tx):
  def step(params, state, x, y):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  # Params and state are donated, as in a real training loop.
  return jax.jit(step, donate_argnums=(0, 1))


def configs(sparsity, every):
  key = jax.random.key(0)
  return {
      "adam (dense)": optax.adam(1e-3),
      "static_random, erk": sj.sparsify(optax.adam(1e-3), sj.static_random(sparsity, key=key)),
      **{f"magnitude, {d}": sj.sparsify(
          optax.adam(1e-3), sj.magnitude(sparsity, update_every=every, distribution=d))
         for d in ("uniform", "erk", "global")},
      "snip, global": sj.sparsify(optax.adam(1e-3), sj.snip(sparsity)),
  }


def main(argv):
  del argv
  every = _UPDATE_EVERY.value
  params0 = mlp_params(jax.random.key(0), [_IN] + [_HIDDEN.value] * _LAYERS.value + [_OUT])
  n_params = sum(p.size for p in jax.tree.leaves(params0))
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (_BATCH.value, _IN))
  y = jax.random.randint(ky, (_BATCH.value,), 0, _OUT)
  print(f"MLP {_IN}-{'-'.join([str(_HIDDEN.value)] * _LAYERS.value)}-{_OUT}: "
        f"{n_params / 1e6:.2f}M params, batch {_BATCH.value}, mask update every {every} steps, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}")

  runs = {}
  for name, tx in configs(_SPARSITY.value, every).items():
    step = make_step(tx)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    params, state = step(params, state, x, y)  # compile, and SNIP's one-shot update
    jax.block_until_ready(params)
    runs[name] = [step, params, state, []]

  for _ in range(_ROUNDS.value):
    for run in runs.values():
      step, params, state, times = run
      start = time.perf_counter()
      for _ in range(every):
        params, state = step(params, state, x, y)
      jax.block_until_ready((params, state))
      times.append((time.perf_counter() - start) / every)
      run[1], run[2] = params, state

  dense = np.median(runs["adam (dense)"][3])
  print(f"\n{'configuration':<26} {'ms/step':>9} {'vs dense':>9}")
  for name, (*_, times) in runs.items():
    t = np.median(times)
    print(f"{name:<26} {1e3 * t:9.2f} {t / dense:9.3f}x")

  # One mask update on its own, against one dense train step.
  print(f"\n{'one mask update':<30} {'ms':>9} {'/ dense step':>13}")
  flat = jax.tree.map(jnp.abs, params0)
  scores = [{"w": layer["w"], "b": None} for layer in flat]

  candidates = {f"top-k, {d}": (
      lambda s, d=d: sj.masks_from_scores(s, _SPARSITY.value, distribution=d))
                for d in ("uniform", "erk", "global")}
  candidates["argsort, uniform (reference)"] = lambda s: argsort_masks(s, _SPARSITY.value)
  for label, fn in candidates.items():
    t = timed(jax.jit(fn), scores, repeats=_ROUNDS.value)
    print(f"{label:<30} {1e3 * t:9.2f} {t / dense:12.2f}x")


if __name__ == "__main__":
  app.run(main)
