"""Data and method set-up shared by the examples (no flags here)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj

METHODS = ("dense", "static_random", "magnitude", "snip", "set_evolution", "rigl", "granet",
           "srigl", "n_m")
ESTIMATORS = ("hard", "ste", "sr_ste", "decay")


def load_data(dataset="digits", path=None, seed=0):
  """Returns (x_train, y_train, x_test, y_test): float32 features in [0, 1], int labels.

  "digits" is scikit-learn's bundled 8x8 digits (1797 images, no download),
  split 80/20 by `seed`. "npz" reads a local .npz with x_train, y_train, x_test
  and y_test (the layout of Keras' mnist.npz).
  """
  if dataset == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order].astype(np.int32)
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]
  if dataset == "npz":
    if not path:
      raise ValueError("dataset 'npz' needs a path")
    with np.load(path) as data:
      xs = [data[k].reshape(len(data[k]), -1).astype(np.float32) for k in ("x_train", "x_test")]
      scale = max(float(xs[0].max()), 1.0)
      return (xs[0] / scale, data["y_train"].astype(np.int32), xs[1] / scale,
              data["y_test"].astype(np.int32))
  raise ValueError(f"unknown dataset {dataset!r}")


def make_method(name, sparsity, distribution, total_steps, key, granularity=None,
                n_m=(2, 4, "sr_ste")):
  """The example's configuration of each method for a run of `total_steps`.

  Pruning methods reach their sparsity by 60% of training; dynamic methods
  update every 2% of training and stop at 75%, as in RigL. `n_m` is
  ``(n, m, estimator)`` for the N:M method (which ignores `sparsity`); its
  decayed gradient flow reaches 0 at 75% of training.
  """
  every = max(total_steps // 50, 1)
  end = 3 * total_steps // 4
  if name == "static_random":
    return sj.static_random(sparsity, key=key, distribution=distribution,
                            granularity=granularity)
  if name == "magnitude":
    schedule = sj.cubic_schedule(sparsity, begin_step=total_steps // 10,
                                 end_step=6 * total_steps // 10)
    return sj.magnitude(schedule, update_every=every, distribution=distribution,
                        granularity=granularity)
  if name == "snip":
    return sj.snip(sparsity, distribution=distribution, granularity=granularity)
  if name == "set_evolution":
    return sj.set_evolution(sparsity, end_step=end, update_every=every,
                            distribution=distribution, granularity=granularity, key=key)
  if name == "rigl":
    return sj.rigl(sparsity, end_step=end, update_every=every, distribution=distribution,
                   granularity=granularity, key=key)
  if name == "granet":
    return sj.granet(sparsity, end_step=6 * total_steps // 10, update_every=every,
                     distribution=distribution, granularity=granularity, key=key)
  if name == "srigl":
    if granularity is not None:
      raise ValueError("srigl is structured already (constant fan-in); use no granularity")
    if distribution == "global":
      distribution = "erk"
    return sj.srigl(sparsity, end_step=end, update_every=every, distribution=distribution,
                    key=key)
  if name == "n_m":
    n, m, estimator = n_m
    grad_scale = optax.linear_schedule(1.0, 0.0, end) if estimator == "decay" else None
    return sj.n_m(n, m, axis=-2, estimator=estimator, grad_scale=grad_scale)
  raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


@nnx.jit(static_argnames="straight_through")
def train_step(model, optimizer, x, y, straight_through=False):
  """One step of softmax cross-entropy on integer labels; returns the loss.

  With `straight_through` (N:M, which keeps dense weights) the forward pass
  sees the weights masked, and the estimator in the optimizer decides what
  the pruned ones learn.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  masks = sj.get_masks(optimizer.opt_state) if straight_through else None

  def loss_fn(params):
    if straight_through:
      params = sj.apply_masks(params, masks, ste=True)
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  optimizer.update(model, grads)
  return loss


def sparse_view(model, optimizer, straight_through):
  """The model as it is deployed: with N:M masks applied to the dense weights."""
  if not straight_through:
    return model
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, sj.sparse_params(params, optimizer.opt_state), rest)


def init_mlp(key, sizes):
  """He-initialized MLP params {"layer{i}": {"kernel", "bias"}} for layer `sizes`."""
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer{i}": {"kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                        "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def mlp_logits(params, x):
  """The MLP of `init_mlp`: ReLU between layers, logits out."""
  *hidden, head = params.values()
  for layer in hidden:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"][None])
  return x @ head["kernel"] + head["bias"][None]
