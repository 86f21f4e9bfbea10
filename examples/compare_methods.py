r"""Every method at 80%, 90% and 95% sparsity on the bundled digits, 3 seeds each.

Writes a markdown table (test accuracy, mean ± std over seeds) and a PNG plot
of accuracy against sparsity per method, with the dense baseline as a line.
Each (method, sparsity) pair is one jitted program that trains all seeds in
turn, so the whole comparison compiles 22 programs.

  python examples/compare_methods.py                       # ~5 min on 2 CPU cores
  python examples/compare_methods.py --methods=rigl,set_evolution --seeds=5
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from _common import load_data, make_method, METHODS  # pylint: disable=g-multiple-import

_METHODS = flags.DEFINE_list("methods", list(METHODS[1:]), "Sparse methods to compare.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Target sparsities.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per configuration.")
_DISTRIBUTION = flags.DEFINE_enum("distribution", "erk", ("uniform", "erk", "global"),
                                  "How the sparsity is split over layers.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
_OUTPUT = flags.DEFINE_string("output", "compare_methods", "Writes OUTPUT.md and OUTPUT.png.")

_SIZES = (64, 300, 100, 10)  # LeNet-300-100 on 8x8 digits


def init_params(key):
  keys = jax.random.split(key, len(_SIZES) - 1)
  return {f"layer{i}": {"kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                        "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, _SIZES[:-1], _SIZES[1:]))}


def logits_fn(params, x):
  for i in range(len(_SIZES) - 1):
    layer = params[f"layer{i}"]
    x = x @ layer["kernel"] + layer["bias"][None]
    x = jax.nn.relu(x) if i < len(_SIZES) - 2 else x
  return x


def make_run(name, sparsity, data, total_steps):
  """One jitted program: train every seed in turn, return test accuracies."""
  x_train, y_train, x_test, y_test = data
  batch, steps_per_epoch = _BATCH_SIZE.value, len(x_train) // _BATCH_SIZE.value

  def one_seed(seed):
    key = jax.random.key(seed)
    tx = optax.adam(_LEARNING_RATE.value)
    if name != "dense":
      tx = sj.sparsify(tx, make_method(name, sparsity, _DISTRIBUTION.value, total_steps,
                                       jax.random.fold_in(key, 1)))
    params = init_params(jax.random.fold_in(key, 0))
    state = tx.init(params)
    params = sj.apply_masks(params, sj.get_masks(state)) if name != "dense" else params

    def step(i, carry):
      params, state = carry
      epoch = i // steps_per_epoch
      order = jax.random.permutation(jax.random.fold_in(key, 2 + epoch), len(x_train))
      idx = jax.lax.dynamic_slice(order, ((i % steps_per_epoch) * batch,), (batch,))
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          logits_fn(p, x_train[idx]), y_train[idx]).mean())(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params, _ = jax.lax.fori_loop(0, total_steps, step, (params, state))
    return jnp.mean(jnp.argmax(logits_fn(params, x_test), -1) == y_test)

  # lax.map runs the seeds one after the other: under vmap, the mask-update
  # lax.cond would run its branch at every step.
  return jax.jit(lambda seeds: jax.lax.map(one_seed, seeds))


def main(argv):
  del argv
  unknown = sorted(set(_METHODS.value) - set(METHODS[1:]))
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; choose from {METHODS[1:]}")
  data = tuple(jnp.asarray(a) for a in load_data("digits", seed=0))
  total_steps = len(data[0]) // _BATCH_SIZE.value * _EPOCHS.value
  seeds = jnp.arange(_SEEDS.value)
  sparsities = [float(s) for s in _SPARSITIES.value]
  start = time.perf_counter()

  dense = np.asarray(make_run("dense", 0.0, data, total_steps)(seeds))
  print(f"dense: {dense.mean():.4f} ± {dense.std():.4f}  ({time.perf_counter() - start:.0f}s)")
  results = {}
  for name in _METHODS.value:
    for sparsity in sparsities:
      acc = np.asarray(make_run(name, sparsity, data, total_steps)(seeds))
      results[name, sparsity] = acc
      print(f"{name} @ {sparsity}: {acc.mean():.4f} ± {acc.std():.4f}  "
            f"({time.perf_counter() - start:.0f}s)", flush=True)

  lines = [f"Test accuracy on digits (LeNet-300-100, {_EPOCHS.value} epochs, adam, "
           f"{_DISTRIBUTION.value}), mean ± std over {_SEEDS.value} seeds; dense: "
           f"{dense.mean():.4f} ± {dense.std():.4f}.", "",
           "| method | " + " | ".join(f"{s:.0%} sparse" for s in sparsities) + " |",
           "| --- |" + " ---: |" * len(sparsities)]
  for name in _METHODS.value:
    cells = [f"{results[name, s].mean():.4f} ± {results[name, s].std():.4f}" for s in sparsities]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  table = "\n".join(lines) + "\n"
  with open(_OUTPUT.value + ".md", "w") as f:
    f.write(table)
  print("\n" + table)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.axhline(dense.mean(), color="black", linestyle="--", label="dense")
  for name in _METHODS.value:
    means = [results[name, s].mean() for s in sparsities]
    stds = [results[name, s].std() for s in sparsities]
    ax.errorbar(sparsities, means, yerr=stds, marker="o", capsize=3, label=name)
  ax.set_xlabel("sparsity")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"digits, LeNet-300-100, {_SEEDS.value} seeds")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(_OUTPUT.value + ".png", dpi=120)
  print(f"wrote {_OUTPUT.value}.md and {_OUTPUT.value}.png in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  app.run(main)
