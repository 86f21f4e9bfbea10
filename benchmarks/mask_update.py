r"""One mask update divided by one dense train step, at 1M, 10M and 50M params.

For each size an MLP 784-h-h-10 is built; a dense adam train step (batch 256,
donated state) is the yardstick. Timed in the same process, median of
`--repeats` runs after a warm-up:

- top-k, uniform / erk / global: exact masks at 90% sparsity from magnitudes;
- rigl update: one RigL drop-and-grow (magnitude drop, gradient growth);
- n_m 2:4: the exact 2:4 mask of every kernel along its inputs;
- argsort: the usual exact top-k with a full stable argsort, for reference
  (skipped above `--argsort_max` params: it takes tens of train steps).

  python benchmarks/mask_update.py
  python benchmarks/mask_update.py --sizes=10 --repeats=5
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

_SIZES = flags.DEFINE_list("sizes", ["1", "10", "50"], "Model sizes in millions of params.")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size of the dense train step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_ARGSORT_MAX = flags.DEFINE_float("argsort_max", 12.0, "Largest size (M) timed with argsort.")
_SPARSITY = 0.9


def hidden_for(millions):
  # 784 h + h^2 + 10 h params; a multiple of 8 so N:M groups fit
  return int((-794 + np.sqrt(794**2 + 4 * millions * 1e6)) / 2) // 8 * 8


def main(argv):
  del argv
  repeats = _REPEATS.value
  print(f"{jax.devices()[0].platform}, jax {jax.__version__}; batch {_BATCH.value}, "
        f"sparsity {_SPARSITY}, median of {repeats}")
  header = (f"{'params':>8} {'dense step':>11} | {'top-k uniform':>16} {'top-k erk':>16} "
            f"{'top-k global':>16} {'rigl update':>16} {'n_m 2:4':>16} {'argsort':>16}")
  print(header)
  print("-" * len(header))
  for size in _SIZES.value:
    h = hidden_for(float(size))
    params = mlp_params(jax.random.key(0), [784, h, h, 10])
    n = sum(p.size for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (_BATCH.value, 784))
    y = jax.random.randint(jax.random.key(2), (_BATCH.value,), 0, 10)
    tx = optax.adam(1e-3)

    def train_step(params, state):
      grads = jax.grad(mlp_loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    p, s = step(p, s)
    jax.block_until_ready(p)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      p, s = step(p, s)
      jax.block_until_ready(p)
      times.append(time.perf_counter() - start)
    dense = float(np.median(times))
    del p, s

    scores = [{"w": jnp.abs(layer["w"]), "b": None} for layer in params]
    cells = []
    for dist in ("uniform", "erk", "global"):
      fn = jax.jit(lambda s, dist=dist: sj.masks_from_scores(s, _SPARSITY, distribution=dist))
      cells.append(timed(fn, scores, repeats=repeats))

    method = sj.rigl(_SPARSITY, end_step=10**6, update_every=1, drop_fraction=0.3,
                     key=jax.random.key(3))
    restricted = [{"w": layer["w"], "b": None} for layer in params]
    masks, state = method.init(restricted)
    grads = jax.grad(mlp_loss)(params, x, y)
    restricted_grads = [{"w": g["w"], "b": None} for g in grads]
    rigl_update = jax.jit(lambda m, p, g: method.update(m, state, p, g, jnp.int32(1))[0])
    cells.append(timed(rigl_update, masks, restricted, restricted_grads, repeats=repeats))
    n_m_masks = jax.jit(lambda s: [sj.n_m_mask(layer["w"], 2, 4, axis=-2) for layer in s])
    cells.append(timed(n_m_masks, scores, repeats=repeats))

    if float(size) <= _ARGSORT_MAX.value:
      cells.append(timed(jax.jit(lambda s: argsort_masks(s, _SPARSITY)), scores, repeats=1))
    else:
      cells.append(None)
    text = [f"{1e3 * t:8.1f} ms {t / dense:5.2f}x" if t is not None else f"{'skipped':>16}"
            for t in cells]
    print(f"{n / 1e6:7.1f}M {1e3 * dense:8.1f} ms | " + " ".join(text), flush=True)


if __name__ == "__main__":
  app.run(main)
