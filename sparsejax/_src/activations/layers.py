"""Sparse-input layers for flax nnx: a trained model's Linear layers, with thresholded inputs."""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from sparsejax._src import pytree
from sparsejax._src.matmul import sparse_input


class InputThreshold(nnx.Variable):
  """Per-input-channel thresholds of a `SparseInputLinear`; not a trainable param."""


class SparseInputLinear(nnx.Module):
  """An ``nnx.Linear`` that zeroes inputs with ``|x_j| <= threshold_j`` and skips their rows.

  It holds the Linear's own `kernel` and `bias` variables (same paths, same
  arrays) and multiplies with `sparse_input_matmul`, which reads only the
  kernel rows at nonzero inputs when a call has at most 16 rows (decoding);
  longer inputs get the dense product of the thresholded input.

  Args:
    linear: the ``nnx.Linear`` to wrap.
    threshold: [in_features] float thresholds (from `sj.activations.teal`,
      `chess` or `wina`).
    implementation: passed to `sparse_input_matmul` (None: the fastest).
  """

  def __init__(self, linear: nnx.Linear, threshold: jax.Array, *,
               implementation: str | None = None):
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.kernel, self.bias = linear.kernel, linear.bias
    self.dtype = linear.dtype
    self.threshold = InputThreshold(jnp.asarray(threshold, jnp.float32))
    self.implementation = implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features]."""
    kernel = self.kernel[...]
    dtype = self.dtype or jnp.result_type(x, kernel)
    x = x.astype(dtype)
    threshold = self.threshold[...].astype(dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    x = jnp.where(jnp.abs(x) > threshold, x, jnp.zeros((), dtype))
    y = sparse_input.sparse_input_matmul(x, kernel.astype(dtype),
                                         implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def sparsify_inputs(model: Any, thresholds: Any, *, implementation: str | None = None) -> Any:
  """Replaces each ``nnx.Linear`` that `thresholds` names by a `SparseInputLinear`.

  Works in place, like `to_block_sparse`, and returns the model: ``nnx.clone``
  it first to keep the dense one. Params keep their paths and values, so a
  checkpoint or optimizer state of the model still pairs with it.

  Args:
    model: a flax nnx Module.
    thresholds: from `sj.activations.teal`, `chess` or `wina` on a calibration
      of this model: [in_features] at the kernel path of every layer to
      sparsify, None elsewhere.
    implementation: passed to `sparse_input_matmul` (None: the fastest).

  Returns:
    The same model.

  Example:
    >>> calibration = sj.calibrate(model, batches, histogram=True, gram=False)
    >>> sparse = sj.nn.sparsify_inputs(nnx.clone(model), sj.activations.teal(calibration, sparsity=0.4))
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"sparsify_inputs: model must be a flax nnx Module, got {type(model).__name__}")
  wanted = {pytree.path_str(p): t for p, t in pytree.flatten(thresholds)[0] if t is not None}
  found = {}
  for path, module in list(nnx.iter_modules(model)):
    kernel = "/".join(str(k) for k in path + ("kernel",))
    if kernel not in wanted:
      continue
    if not isinstance(module, nnx.Linear):
      raise ValueError(f"sparsify_inputs: {kernel} belongs to a {type(module).__name__}; only "
                       "nnx.Linear layers take sparse inputs. Leave it out of the calibration "
                       "(sj.calibrate(where=...))")
    threshold = jnp.asarray(wanted[kernel])
    if threshold.shape != (module.in_features,):
      raise ValueError(f"sparsify_inputs: thresholds at {kernel} have shape {threshold.shape}; "
                       f"the layer takes {module.in_features} inputs")
    if not path:
      raise ValueError("sparsify_inputs: model is itself a Linear; wrap it directly with "
                       "sj.nn.SparseInputLinear")
    found[kernel] = (path, SparseInputLinear(module, threshold, implementation=implementation))
  missing = sorted(set(wanted) - set(found))
  if missing:
    raise ValueError(f"sparsify_inputs: thresholds name {missing}, which are not Linear kernels "
                     "of the model; give thresholds calibrated on this model")
  for path, layer in found.values():
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
      parent[path[-1]] = layer
    else:
      setattr(parent, path[-1], layer)
  return model
