r"""Lottery tickets and sparse model soups on scikit-learn's bundled digits.

Two prune-retrain loops over an MLP (64-256-128-10), pruning the kernels by
global magnitude a fraction `--prune_fraction` of what is left per round:

* Iterative magnitude pruning with weight rewinding (the lottery ticket
  procedure): train, prune the smallest weights, rewind the survivors to
  their values at `--rewind_step`, retrain with the mask fixed, repeat.
* Sparse model soups: prune the current model, retrain `--soup_size` copies
  that share the mask but see the data in different orders, average them
  (the average keeps the mask exactly, which the script checks) and prune
  the average in the next round.

Each retraining runs `sj.sparsify` with `sj.fixed(masks)`, the method that
holds a given mask.

References: The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks. Frankle & Carbin, 2019. arXiv:1803.03635. Stabilizing the Lottery
Ticket Hypothesis (rewinding). Frankle et al., 2019. arXiv:1903.01611.
Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging.
Zimmer, Spiegel, Pokutta, 2023. arXiv:2306.16788.

  python examples/lottery.py
  python examples/lottery.py --rounds=5 --prune_fraction=0.5 --soup_size=4
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from _common import load_data

_ROUNDS = flags.DEFINE_integer("rounds", 4, "Prune-retrain rounds.")
_PRUNE_FRACTION = flags.DEFINE_float("prune_fraction", 0.5,
                                     "Fraction of the remaining kernel weights pruned per round.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps per (re)training.")
_REWIND_STEP = flags.DEFINE_integer("rewind_step", 40, "Step the lottery ticket rewinds to.")
_SOUP_SIZE = flags.DEFINE_integer("soup_size", 3, "Copies averaged per soup.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DATASET = flags.DEFINE_enum("dataset", "digits", ("digits", "npz"), "Dataset.")
_DATA_PATH = flags.DEFINE_string("data_path", None, "Path of the .npz for --dataset=npz.")


def init_params(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def forward(params, x):
  *hidden, last = params.values()
  for layer in hidden:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"][None])
  return x @ last["kernel"] + last["bias"][None]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(forward(params, x), -1) == y)


def train(params, masks, data, steps, seed, start=0):
  """Adam from a fresh state, with `masks` fixed (None: dense); returns params."""
  x, y = data
  tx = optax.adam(_LEARNING_RATE.value)
  if masks is not None:
    tx = sj.sparsify(tx, sj.fixed(masks), where="kernel")
    params = sj.apply_masks(params, masks)
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    grads = jax.grad(loss_fn)(params, xb, yb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  batch = _BATCH_SIZE.value
  for _ in range(start, steps):
    idx = rng.choice(len(x), batch, replace=False)
    params, state = step(params, state, x[idx], y[idx])
  return params


def prune(params, masks, sparsity):
  """Global magnitude masks at `sparsity` over the kernels, among kept weights."""
  scores = {name: {"kernel": jnp.abs(layer["kernel"]) if masks is None else
                   jnp.where(masks[name]["kernel"], jnp.abs(layer["kernel"]), -jnp.inf),
                   "bias": None}
            for name, layer in params.items()}
  return sj.masks_from_scores(scores, sparsity, distribution="global")


def kernel_sparsity(params):
  kernels = [np.asarray(layer["kernel"]) for layer in params.values()]
  return 1.0 - sum(np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)


def keeps_mask(params, masks):
  return all(bool(jnp.all(layer["kernel"][~masks[name]["kernel"]] == 0))
             for name, layer in params.items())


def main(argv):
  del argv
  if _DATASET.value == "npz" and not _DATA_PATH.value:
    raise app.UsageError("--dataset=npz needs --data_path")
  if not 0 < _REWIND_STEP.value < _STEPS.value:
    raise app.UsageError("--rewind_step must be in (0, --steps)")
  x_train, y_train, x_test, y_test = load_data(_DATASET.value, _DATA_PATH.value, _SEED.value)
  data = (jnp.asarray(x_train), jnp.asarray(y_train))
  sizes = [x_train.shape[1], 256, 128, int(max(y_train.max(), y_test.max())) + 1]
  test = lambda p: float(accuracy(p, x_test, y_test))  # noqa: E731
  start = time.perf_counter()

  # Dense baseline, and the weights at the rewinding step.
  init = init_params(jax.random.key(_SEED.value), sizes)
  rewind = train(init, None, data, _REWIND_STEP.value, _SEED.value)
  dense = train(rewind, None, data, _STEPS.value, _SEED.value, start=_REWIND_STEP.value)
  print(f"dense: test acc {test(dense):.4f}  ({time.perf_counter() - start:.1f}s)")

  rows = []
  ticket, ticket_masks = dense, None
  soup, soup_masks = dense, None
  for r in range(1, _ROUNDS.value + 1):
    sparsity = 1.0 - (1.0 - _PRUNE_FRACTION.value) ** r
    # Lottery ticket: prune the trained ticket, rewind the survivors, retrain.
    ticket_masks = prune(ticket, ticket_masks, sparsity)
    ticket = train(rewind, ticket_masks, data, _STEPS.value, _SEED.value + r,
                   start=_REWIND_STEP.value)
    # Soup: prune the last soup, retrain copies in different data orders, average.
    soup_masks = prune(soup, soup_masks, sparsity)
    copies = [train(soup, soup_masks, data, _STEPS.value, 1000 * r + c)
              for c in range(_SOUP_SIZE.value)]
    soup = jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *copies)
    exact = keeps_mask(soup, soup_masks)
    if not exact:
      raise AssertionError(f"round {r}: the soup moved a pruned weight off zero")
    copies_acc = np.mean([test(c) for c in copies])
    rows.append((r, kernel_sparsity(ticket), test(ticket), kernel_sparsity(soup), copies_acc,
                 test(soup)))
    print(f"round {r}: sparsity {sparsity:.3f}  ticket acc {rows[-1][2]:.4f}  "
          f"soup copies {copies_acc:.4f} -> soup {rows[-1][5]:.4f} (mask kept exactly)  "
          f"({time.perf_counter() - start:.1f}s)", flush=True)

  print(f"\n| round | ticket sparsity | ticket acc | soup sparsity | mean copy acc | soup acc |\n"
        f"| ---: | ---: | ---: | ---: | ---: | ---: |\n| 0 (dense) | 0.000 | {test(dense):.4f} "
        f"| 0.000 | | {test(dense):.4f} |")
  for r, ts, ta, ss, ca, sa in rows:
    print(f"| {r} | {ts:.3f} | {ta:.4f} | {ss:.3f} | {ca:.4f} | {sa:.4f} |")


if __name__ == "__main__":
  app.run(main)
