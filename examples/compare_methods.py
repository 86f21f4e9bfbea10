r"""Every method at 80%, 90% and 95% sparsity on the bundled digits, 3 seeds each,
and the N:M estimators (hard, STE, SR-STE, decayed gradient flow) at 2:4, 1:4
and 1:8.

Writes markdown tables (test accuracy, mean ± std over seeds) and a PNG with
accuracy against sparsity per method and per estimator, the dense baseline as
a line. Each configuration is one jitted program that trains all seeds in
turn, so the whole comparison compiles 35 programs.

  python examples/compare_methods.py                       # ~3 min on 2 CPU cores
  python examples/compare_methods.py --methods=rigl,set_evolution --seeds=5 --non_m
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from _common import ESTIMATORS, METHODS  # pylint: disable=g-multiple-import
from _common import init_mlp, load_data, make_method, mlp_logits  # pylint: disable=g-multiple-import

_SPARSE = [m for m in METHODS if m not in ("dense", "n_m")]
_METHODS = flags.DEFINE_list("methods", _SPARSE, "Sparse methods to compare.")
_N_M = flags.DEFINE_bool("n_m", True, "Also compare the N:M estimators.")
_PATTERNS = flags.DEFINE_list("patterns", ["2:4", "1:4", "1:8"], "N:M patterns.")
_ESTIMATORS = flags.DEFINE_list("estimators", list(ESTIMATORS), "N:M estimators.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Target sparsities.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per configuration.")
_DISTRIBUTION = flags.DEFINE_enum("distribution", "erk", ("uniform", "erk", "global"),
                                  "How the sparsity is split over layers.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
_OUTPUT = flags.DEFINE_string("output", "compare_methods", "Writes OUTPUT.md and OUTPUT.png.")

_SIZES = (64, 256, 128, 10)  # an MLP on 8x8 digits; 8 divides every fan-in for 1:8


def make_run(name, sparsity, data, total_steps, n_m=(2, 4, "sr_ste")):
  """One jitted program: train every seed in turn, return test accuracies."""
  x_train, y_train, x_test, y_test = data
  batch, steps_per_epoch = _BATCH_SIZE.value, len(x_train) // _BATCH_SIZE.value

  def one_seed(seed):
    key = jax.random.key(seed)
    tx = optax.adam(_LEARNING_RATE.value)
    straight_through = name == "n_m"
    if name != "dense":
      tx = sj.sparsify(tx, make_method(name, sparsity, _DISTRIBUTION.value, total_steps,
                                       jax.random.fold_in(key, 1), n_m=n_m))
    params = init_mlp(jax.random.fold_in(key, 0), _SIZES)
    state = tx.init(params)
    if name != "dense" and not straight_through:
      params = sj.apply_masks(params, sj.get_masks(state))

    def step(i, carry):
      params, state = carry
      epoch = i // steps_per_epoch
      order = jax.random.permutation(jax.random.fold_in(key, 2 + epoch), len(x_train))
      idx = jax.lax.dynamic_slice(order, ((i % steps_per_epoch) * batch,), (batch,))
      def loss(p):
        if straight_through:  # dense shadow weights, masked in the forward pass
          p = sj.apply_masks(p, sj.get_masks(state), ste=True)
        return optax.softmax_cross_entropy_with_integer_labels(
            mlp_logits(p, x_train[idx]), y_train[idx]).mean()

      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    params, state = jax.lax.fori_loop(0, total_steps, step, (params, state))
    if straight_through:
      params = sj.sparse_params(params, state)
    return jnp.mean(jnp.argmax(mlp_logits(params, x_test), -1) == y_test)

  # lax.map runs the seeds one after the other: under vmap, the mask-update
  # lax.cond would run its branch at every step.
  return jax.jit(lambda seeds: jax.lax.map(one_seed, seeds))


def main(argv):
  del argv
  unknown = sorted(set(_METHODS.value) - set(_SPARSE))
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; choose from {_SPARSE}")
  patterns = [tuple(int(v) for v in p.split(":")) for p in _PATTERNS.value]
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

  n_m_results = {}
  if _N_M.value:
    for estimator in _ESTIMATORS.value:
      for n, m in patterns:
        acc = np.asarray(make_run("n_m", 0.0, data, total_steps, (n, m, estimator))(seeds))
        n_m_results[estimator, (n, m)] = acc
        print(f"n_m {n}:{m} {estimator}: {acc.mean():.4f} ± {acc.std():.4f}  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)

  cell = lambda acc: f"{acc.mean():.4f} ± {acc.std():.4f}"
  lines = [f"Test accuracy on digits (MLP 64-256-128-10, {_EPOCHS.value} epochs, adam, "
           f"{_DISTRIBUTION.value}), mean ± std over {_SEEDS.value} seeds; dense: "
           f"{cell(dense)}.", "",
           "| method | " + " | ".join(f"{s:.0%} sparse" for s in sparsities) + " |",
           "| --- |" + " ---: |" * len(sparsities)]
  for name in _METHODS.value:
    lines.append(f"| {name} | " + " | ".join(cell(results[name, s]) for s in sparsities) + " |")
  if n_m_results:
    lines += ["", "N:M along each kernel's inputs, dense shadow weights, masks recomputed "
              "every step; the decay estimator's gradient scale reaches 0 at 75% of training.",
              "", "| estimator | " + " | ".join(f"{n}:{m}" for n, m in patterns) + " |",
              "| --- |" + " ---: |" * len(patterns)]
    for estimator in _ESTIMATORS.value:
      lines.append(f"| {estimator} | " + " | ".join(
          cell(n_m_results[estimator, p]) for p in patterns) + " |")
  table = "\n".join(lines) + "\n"
  with open(_OUTPUT.value + ".md", "w") as f:
    f.write(table)
  print("\n" + table)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2 if n_m_results else 1, figsize=(12 if n_m_results else 7, 4.5),
                           squeeze=False)
  curves = [(axes[0, 0], "methods", [(name, sparsities, [results[name, s] for s in sparsities])
                                     for name in _METHODS.value])]
  if n_m_results:
    xs = [1 - n / m for n, m in patterns]
    curves.append((axes[0, 1], "N:M estimators (x: 1 - n/m)",
                   [(e, xs, [n_m_results[e, p] for p in patterns]) for e in _ESTIMATORS.value]))
  for ax, title, lines_ in curves:
    ax.axhline(dense.mean(), color="black", linestyle="--", label="dense")
    for label, x, accs in lines_:
      order = np.argsort(x)
      ax.errorbar(np.asarray(x)[order], [accs[i].mean() for i in order],
                  yerr=[accs[i].std() for i in order], marker="o", capsize=3, label=label)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {title}, {_SEEDS.value} seeds")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(_OUTPUT.value + ".png", dpi=120)
  print(f"wrote {_OUTPUT.value}.md and {_OUTPUT.value}.png in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  app.run(main)
