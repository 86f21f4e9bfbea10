"""OWL: per-layer sparsities from each layer's share of outlier weights."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import calibration as calibration_lib
from sparsejax._src import pytree


@jax.jit
def _outlier_ratio(w, norms, threshold):
  scores = jnp.abs(w) * norms[:, None]
  return jnp.mean(scores > threshold * jnp.mean(scores))


def _balanced(ratios: np.ndarray, sizes: np.ndarray, sparsity: float, band: float) -> np.ndarray:
  """Sparsities in [s - band, s + band], lower for more outliers, size-weighted mean s."""
  lo, hi = max(sparsity - band, 0.0), min(sparsity + band, np.nextafter(1.0, 0.0))
  spread = ratios.max() - ratios.min()
  if spread <= 0 or band == 0:
    return np.full(ratios.shape, sparsity)
  base = sparsity + band * (1.0 - 2.0 * (ratios - ratios.min()) / spread)

  def mean(shift):
    return np.sum(sizes * np.clip(base + shift, lo, hi)) / np.sum(sizes)

  left, right = -2.0, 2.0  # mean(shift) is monotone: bisect for the exact target
  for _ in range(200):
    mid = 0.5 * (left + right)
    left, right = (mid, right) if mean(mid) < sparsity else (left, mid)
  return np.clip(base + 0.5 * (left + right), lo, hi)


def owl(
    params: Any,
    calibration: calibration_lib.Calibration,
    *,
    sparsity: float,
    threshold: float = 5.0,
    band: float = 0.08,
) -> Any:
  """OWL: layerwise sparsities that spare the layers with the most outliers.

  A layer's outlier ratio is the share of its Wanda scores ``|W_ij| ||X_j||``
  above `threshold` times their mean. Sparsities fall linearly with the ratio
  over ``[sparsity - band, sparsity + band]`` and are shifted so that their
  mean weighted by layer size is exactly `sparsity`: the model keeps the
  target count (for layers of one size, as in the paper's transformer
  blocks, this is the plain mean).

  Reference: Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
  Sauce for Pruning LLMs to High Sparsity. Yin, Wu, Zhang, et al., 2024.
  arXiv:2310.05175.

  Args:
    params: the calibrated nnx Module, or its params.
    calibration: from `sj.calibrate` (norms only: ``gram=False`` is enough).
    sparsity: the target, a float in [0, 1).
    threshold: the outlier threshold M, in multiples of the layer's mean score.
    band: the largest deviation from `sparsity` (the paper's lambda).

  Returns:
    the sparsities: a float at every calibrated kernel, None elsewhere (the
    params' structure). Pass them as `sparsity` to any rule of `sj.prune`,
    or to a `sparsify` distribution with `sj.prune.overrides`.

  Example:
    >>> sparsities = sj.prune.owl(model, calibration, sparsity=0.7)
    >>> masks = sj.prune.wanda(model, calibration, sparsity=sparsities)
  """
  owner = "sj.prune.owl"
  calibration_lib.check_calibration(owner, calibration)
  _checks.fraction("sparsity", sparsity, schedule=False)
  for name, value in (("threshold", threshold), ("band", band)):
    _checks.static_float(name, value)
    if not value >= 0:
      raise ValueError(f"{name}={value} must be >= 0")
  leaves, treedef = pytree.flatten(calibration_lib.as_params(params))
  kernels = calibration_lib.kernel_matrices(owner, params, calibration)
  ratios, sizes = [], []
  for layer in calibration.layers:
    w = kernels[layer.path]
    ratios.append(float(_outlier_ratio(w, calibration[layer.path].norms(), threshold)))
    sizes.append(layer.d_in * layer.d_out)
  out = _balanced(np.array(ratios), np.array(sizes, np.float64), float(sparsity), float(band))
  by_path = {l.path: float(s) for l, s in zip(calibration.layers, out)}
  return jax.tree_util.tree_unflatten(
      treedef, [by_path.get(pytree.path_str(p)) for p, _ in leaves])


def overrides(sparsities: Any) -> dict[str, float]:
  """Per-layer sparsities (from `owl`) as a distribution's ``overrides``.

  Example:
    >>> dist = sj.Uniform(overrides=sj.prune.overrides(sparsities))
    >>> tx = sj.sparsify(optax.adam(1e-3), sj.magnitude(0.7, distribution=dist))
  """
  return {f"^{re.escape(pytree.path_str(p))}$": float(s)
          for p, s in pytree.flatten(sparsities)[0] if s is not None}
