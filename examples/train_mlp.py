r"""Trains a sparse MLP (64-256-128-10) on scikit-learn's bundled digits dataset.

The sparsity method is an optax transformation: `nnx.Optimizer` drives it and
the training step has no sparsity-specific code at all.

  python examples/train_mlp.py --method=magnitude --sparsity=0.9
  python examples/train_mlp.py --method=rigl --sparsity=0.95 --plot
  python examples/train_mlp.py --method=rigl --granularity=block   # 4x4 tiles, then
                                                                   # block-sparse inference
  python examples/train_mlp.py --method=n_m --n=2 --m=4 --estimator=sr_ste
  python examples/train_mlp.py --dataset=npz --data_path=mnist.npz   # your own data

`--dataset=npz` reads a local .npz with arrays x_train, y_train, x_test and
y_test (the layout of Keras' mnist.npz); nothing is downloaded.
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sparsejax as sj
from _common import ESTIMATORS, load_data, make_method, METHODS, sparse_view, train_step  # pylint: disable=g-multiple-import

_METHOD = flags.DEFINE_enum("method", "magnitude", METHODS, "Sparsity method.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.9, "Target sparsity of the sparsified leaves.")
_DISTRIBUTION = flags.DEFINE_enum("distribution", "erk", ("uniform", "erk", "global"),
                                  "How the sparsity is split over layers.")
_GRANULARITY = flags.DEFINE_enum(
    "granularity", "element", ("element", "block", "channel"),
    "Unit of sparsity. block: --block_shape tiles; channel: whole hidden neurons. Structured "
    "runs sparsify the two hidden kernels and keep the classifier dense.")
_BLOCK_SHAPE = flags.DEFINE_list("block_shape", ["4", "4"], "Tile shape for --granularity=block.")
_N = flags.DEFINE_integer("n", 2, "--method=n_m: weights kept per group.")
_M = flags.DEFINE_integer("m", 4, "--method=n_m: group size (along each kernel's inputs).")
_ESTIMATOR = flags.DEFINE_enum("estimator", "sr_ste", ESTIMATORS, "--method=n_m: estimator.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DATASET = flags.DEFINE_enum("dataset", "digits", ("digits", "npz"), "Dataset.")
_DATA_PATH = flags.DEFINE_string("data_path", None, "Path of the .npz for --dataset=npz.")
_PLOT = flags.DEFINE_bool("plot", False, "Write a PNG of accuracy and sparsity over steps.")
_PLOT_PATH = flags.DEFINE_string("plot_path", "train_mlp.png", "Where --plot writes.")


class MLP(nnx.Module):
  """An MLP with two hidden layers of 256 and 128 units.

  With `block_shape` the hidden layers are `sj.nn.BlockSparseLinear`: dense
  kernels while training (the optimizer prunes whole tiles), block-sparse
  matmuls after `sj.nn.to_block_sparse`.
  """

  def __init__(self, features, classes, rngs, block_shape=None):
    if block_shape is None:
      hidden = nnx.Linear
    else:
      hidden = functools.partial(sj.nn.BlockSparseLinear, block_shape=block_shape)
    self.hidden1 = hidden(features, 256, rngs=rngs)
    self.hidden2 = hidden(256, 128, rngs=rngs)
    self.out = nnx.Linear(128, classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.hidden1(x))
    x = jax.nn.relu(self.hidden2(x))
    return self.out(x)


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def kernel_sparsity(model):
  kernels = [np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if path[-1] == "kernel"]
  return 1.0 - sum(np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)


def mask_flips(optimizer):
  """N:M's sparse architecture divergence: mask entries flipped at the last update."""
  flips = optax.tree.get(optimizer.opt_state, "flips")
  return int(np.asarray(flips.get_value() if hasattr(flips, "get_value") else flips))


def main(argv):
  del argv
  if _DATASET.value == "npz" and not _DATA_PATH.value:
    raise app.UsageError("--dataset=npz needs --data_path")
  x_train, y_train, x_test, y_test = load_data(_DATASET.value, _DATA_PATH.value, _SEED.value)
  classes = int(max(y_train.max(), y_test.max())) + 1
  steps_per_epoch = len(x_train) // _BATCH_SIZE.value
  total_steps = steps_per_epoch * _EPOCHS.value
  key = jax.random.key(_SEED.value)

  block_shape = None
  if _GRANULARITY.value == "block" and _METHOD.value not in ("dense", "n_m"):
    block_shape = tuple(int(b) for b in _BLOCK_SHAPE.value)
  model = MLP(x_train.shape[1], classes, nnx.Rngs(_SEED.value), block_shape)
  tx = optax.adam(_LEARNING_RATE.value)
  if _METHOD.value != "dense":
    granularity, where = None, None  # every kernel, entry by entry; biases stay dense
    if _GRANULARITY.value == "block":
      granularity, where = sj.Block(tuple(int(b) for b in _BLOCK_SHAPE.value)), "hidden.*kernel"
    elif _GRANULARITY.value == "channel":
      granularity, where = sj.Channel(axis=-1), "hidden.*kernel"
    method = make_method(_METHOD.value, _SPARSITY.value, _DISTRIBUTION.value, total_steps, key,
                         granularity, (_N.value, _M.value, _ESTIMATOR.value))
    tx = sj.sparsify(tx, method, where=where)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  straight_through = _METHOD.value == "n_m"

  target = (f"{_N.value}:{_M.value} {_ESTIMATOR.value}" if straight_through else
            f"sparsity {0.0 if _METHOD.value == 'dense' else _SPARSITY.value:.2f} "
            f"({_DISTRIBUTION.value}, {_GRANULARITY.value})")
  print(f"{_METHOD.value} on {_DATASET.value}: {len(x_train)} train / {len(x_test)} test, "
        f"{total_steps} steps, target {target}")
  history = {"step": [], "sparsity": [], "epoch_step": [], "test_acc": []}
  rng = np.random.default_rng(_SEED.value)
  start = time.perf_counter()
  for epoch in range(1, _EPOCHS.value + 1):
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * _BATCH_SIZE.value:(i + 1) * _BATCH_SIZE.value]
      losses.append(train_step(model, optimizer, x_train[idx], y_train[idx], straight_through))
      if _PLOT.value:
        history["step"].append((epoch - 1) * steps_per_epoch + i + 1)
        history["sparsity"].append(kernel_sparsity(sparse_view(model, optimizer,
                                                               straight_through)))
    deployed = sparse_view(model, optimizer, straight_through)
    test_acc = float(accuracy(deployed, x_test, y_test))
    history["epoch_step"].append(epoch * steps_per_epoch)
    history["test_acc"].append(test_acc)
    flips = f"  mask flips {mask_flips(optimizer)}" if straight_through else ""
    print(f"epoch {epoch:3d}  loss {float(np.mean(losses)):.4f}  "
          f"train acc {float(accuracy(deployed, x_train, y_train)):.4f}  test acc {test_acc:.4f}  "
          f"kernel sparsity {kernel_sparsity(deployed):.4f}{flips}  "
          f"{time.perf_counter() - start:6.1f}s")

  print(f"\nfinal test accuracy: {history['test_acc'][-1]:.4f}")
  params = nnx.state(sparse_view(model, optimizer, straight_through), nnx.Param)
  masks = sj.get_masks(optimizer.opt_state) if _METHOD.value != "dense" else None
  print(sj.summary(params, masks))
  if block_shape is not None:
    # Inference with block-sparse matmuls over the tiles the optimizer kept.
    sj.nn.to_block_sparse(model)
    blocks = {name: f"{int(layer.layout[...].sum())}/{layer.layout[...].size}"
              for name, layer in [("hidden1", model.hidden1), ("hidden2", model.hidden2)]}
    print(f"block-sparse inference: test acc {float(accuracy(model, x_test, y_test)):.4f}, "
          f"active {block_shape[0]}x{block_shape[1]} tiles {blocks}")

  if _PLOT.value:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["epoch_step"], history["test_acc"], "o-", label="test accuracy")
    ax.plot(history["step"], history["sparsity"], label="kernel sparsity")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{_METHOD.value}, target {target}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(_PLOT_PATH.value, dpi=120)
    print(f"wrote {_PLOT_PATH.value}")


if __name__ == "__main__":
  app.run(main)
