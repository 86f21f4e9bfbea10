"""Training-free activation sparsity: calibrated thresholds on a trained model's layer inputs.

Each rule turns a calibration (``sj.calibrate(model, batches,
histogram=True)``) into *thresholds*: a pytree paired with the params, a
float32 [d_in] array at every calibrated kernel (None elsewhere). A layer
then zeroes every input entry with ``|x_j| <= threshold_j`` before its
matmul (`sj.nn.sparsify_inputs`). The rules differ only in how they place
the thresholds to reach `sparsity`, the share of input entries zeroed:

* `teal`: one magnitude threshold per layer (TEAL),
* `chess`: one per input channel, each channel zeroed at the same rate (CHESS),
* `wina`: one threshold on ``|x_j| * ||W_j||`` per layer, the input's
  magnitude weighted by the norm of the weight row it multiplies (WINA),
  so a small input that meets a large row is kept.

Sparsity is reached on average over tokens, as in TEAL: a token with many
large entries keeps more of them. Thresholds come from the calibration's
``|x|`` histograms, so they are exact to within a histogram bin (4.4% in
value); on held-out data of the same kind the reached share is within a
point of the target (tested).

References:
  Training-Free Activation Sparsity in Large Language Models (TEAL). Liu,
  Ponnusamy, Cai, Guo, Kim, Athiwaratkun, 2024. arXiv:2408.14690.
  CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and Selective
  Sparsification. Wang et al., 2024. arXiv:2409.01366.
  WINA: Weight Informed Neuron Activation for Accelerating Large Language
  Model Inference. Chen et al., 2025. arXiv:2505.19427.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import calibration as calibration_lib
from sparsejax._src import pytree

PyTree = Any


def _with_histograms(owner: str, calibration: Any) -> calibration_lib.Calibration:
  calibration = calibration_lib.check_calibration(owner, calibration)
  if not calibration.has_histogram:
    raise ValueError(f"{owner}: the calibration has no |x| histograms: calibrate with "
                     "sj.calibrate(model, batches, histogram=True)")
  return calibration


def _thresholds(owner: str, calibration: Any, sparsity: Any,
                rule: Callable[[calibration_lib.Layer, calibration_lib.LayerStats, Any],
                               jax.Array]) -> PyTree:
  calibration = _with_histograms(owner, calibration)
  calibration_lib.check_sparsity(sparsity)
  per_layer = calibration_lib.layer_sparsities(owner, sparsity, calibration.layers)
  found = {l.path: rule(l, calibration[l.path], jnp.float32(per_layer[l.path]))
           for l in calibration.layers}
  return calibration.paired(found)


def teal(calibration: Any, *, sparsity: Any) -> PyTree:
  """TEAL: per layer, the magnitude below which a share `sparsity` of its inputs lie.

  Args:
    calibration: from ``sj.calibrate(model, batches, histogram=True)``.
    sparsity: share of input entries to zero, a float in [0, 1) or a
      per-layer tree (as in `sj.prune`).

  Returns:
    thresholds: float32 [d_in] (one value repeated) at every calibrated kernel.

  Example:
    >>> calibration = sj.calibrate(model, batches, histogram=True, gram=False)
    >>> sj.nn.sparsify_inputs(model, sj.activations.teal(calibration, sparsity=0.4))
  """
  def rule(layer, stats, s):
    return jnp.full([layer.d_in], stats.abs_quantile(s), jnp.float32)
  return _thresholds("teal", calibration, sparsity, rule)


def chess(calibration: Any, *, sparsity: Any) -> PyTree:
  """CHESS: per input channel, the magnitude below which a share `sparsity` of it lies.

  Channels of very different scales (outlier features) are each zeroed at
  the target rate, where one per-layer threshold would zero the small
  channels always and the large ones never. Arguments and result as `teal`.
  """
  def rule(layer, stats, s):
    del layer
    return stats.abs_quantile(s, per_channel=True)
  return _thresholds("chess", calibration, sparsity, rule)


@jax.jit
def _weighted_threshold(hist: jax.Array, scale: jax.Array, s: jax.Array) -> jax.Array:
  """Per-channel thresholds ``t / scale_j`` with ``t`` such that a share `s` of ``|x_j| scale_j`` is <= t."""
  scale = jnp.maximum(scale, 1e-30)
  total = hist.sum()
  counts = hist.sum(-1)

  def share_below(log_t):
    return jnp.sum(calibration_lib.hist_cdf(hist, 2.0 ** log_t / scale) * counts) / total

  lo = calibration_lib.HIST_LOW - 1.0 + jnp.log2(jnp.min(scale))
  hi = calibration_lib.HIST_HIGH + 1.0 + jnp.log2(jnp.max(scale))

  def bisect(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) / 2
    below = share_below(mid) < s
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  _, hi = jax.lax.fori_loop(0, 48, bisect, (lo, hi))
  return jnp.where(s > 0, 2.0 ** hi / scale, 0.0)


def wina(params: Any, calibration: Any, *, sparsity: Any) -> PyTree:
  """WINA: per layer, a threshold on ``|x_j| * ||W_j||``, input times weight-row norm.

  ``W_j`` is the row of the kernel (as a [d_in, d_out] matrix) that input
  ``j`` multiplies; its norm is how much the output moves per unit of
  ``x_j``. One threshold on the product reaches `sparsity` on the
  calibration, and is returned as the per-channel magnitude thresholds
  ``t / ||W_j||``. WINA's paper keeps a fixed top-k of the product per
  token; a calibrated threshold keeps the same entries on average and one
  form for all three rules.

  Args:
    params: the calibrated nnx Module, or its params (``nnx.state(model,
      nnx.Param)``).
    calibration: from ``sj.calibrate(model, batches, histogram=True)``.
    sparsity: as in `teal`.

  Returns:
    thresholds: float32 [d_in] at every calibrated kernel.
  """
  calibration = calibration_lib.check_calibration("wina", calibration)
  kernels = calibration_lib.kernel_matrices("wina", params, calibration)

  def rule(layer, stats, s):
    return _weighted_threshold(stats.abs_hist, jnp.linalg.norm(kernels[layer.path], axis=1), s)
  return _thresholds("wina", calibration, sparsity, rule)


def _relative_errors(hist: np.ndarray, row_norms: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """A layer's relative output error ``||dX W||^2 / ||X W||^2`` at each sparsity in `levels`.

  With TEAL's one threshold, sparsity s zeroes the smallest share s of the
  inputs: from the histogram, whole bins from the bottom and a share of the
  bin where s falls. Each zeroed entry costs ``x^2 ||W_j||^2`` (cross terms
  between channels neglected), x at its bin's geometric middle.
  """
  bins = np.arange(calibration_lib.HIST_BINS)
  middle = 2.0 ** (calibration_lib.HIST_LOW + (bins - 0.5) / calibration_lib.HIST_PER_OCTAVE)
  middle[0] = 0.0
  counts = hist.sum(0)
  energy = (row_norms ** 2 @ hist) * middle ** 2  # per bin, over channels
  cum_counts = np.concatenate([[0.0], np.cumsum(counts)])
  cum_energy = np.concatenate([[0.0], np.cumsum(energy)])
  target = levels * cum_counts[-1]
  b = np.clip(np.searchsorted(cum_counts, target, side="right") - 1, 0, len(counts) - 1)
  share = np.clip((target - cum_counts[b]) / np.maximum(counts[b], 1e-30), 0.0, 1.0)
  return (cum_energy[b] + share * energy[b]) / max(cum_energy[-1], 1e-30)


def allocate(params: Any, calibration: Any, *, sparsity: float, step: float = 0.05) -> PyTree:
  """Per-layer sparsities by TEAL's greedy allocation, their size-weighted mean exactly `sparsity`.

  Starting from zero everywhere, each round raises by `step` the layer whose
  relative output error (estimated from the calibration's histograms and
  the kernel's row norms, for TEAL's per-layer threshold) grows least per
  weight read skipped, until the mean over layers, weighted by kernel size,
  reaches `sparsity`; the last layer raised gives back the excess. Layers
  whose inputs are mostly small (heavy-tailed, or near-zero channels) take
  more sparsity, those where every input matters take less. TEAL measures
  each block's output error with forward passes; here the estimate is
  per layer, from statistics already calibrated, so no pass is needed.

  Args:
    params: the calibrated nnx Module, or its params.
    calibration: from ``sj.calibrate(model, batches, histogram=True)``.
    sparsity: the mean target, a float in [0, 1 - step].
    step: the increment of one round, in (0, 0.5].

  Returns:
    the sparsities: a float at every calibrated kernel, None elsewhere (the
    params' structure), for `teal`, `chess` or `wina`.

  Example:
    >>> sparsities = sj.activations.allocate(model, calibration, sparsity=0.5)
    >>> thresholds = sj.activations.teal(calibration, sparsity=sparsities)
  """
  owner = "allocate"
  calibration = _with_histograms(owner, calibration)
  _checks.static_float("step", step)
  if not 0 < step <= 0.5:
    raise ValueError(f"step={step} must be in (0, 0.5]")
  _checks.fraction("sparsity", sparsity, schedule=False)
  levels = np.round(np.arange(int(np.floor((1 - 1e-9) / step)) + 1) * step, 12)
  top = levels[-1]  # the highest level below 1
  if sparsity > top + 1e-12:
    raise ValueError(f"sparsity={sparsity} must be at most {top:g}, the highest multiple of "
                     f"step={step} below 1")
  kernels = calibration_lib.kernel_matrices(owner, params, calibration)
  layers = calibration.layers
  errors = [_relative_errors(np.asarray(calibration[l.path].abs_hist, np.float64),
                             np.linalg.norm(np.asarray(kernels[l.path], np.float64), axis=1),
                             levels) for l in layers]
  sizes = np.array([l.d_in * l.d_out for l in layers], np.float64)
  level = np.zeros(len(layers), int)
  goal = sparsity * sizes.sum()
  reached = 0.0
  while reached < goal:
    cost = [(e[k + 1] - e[k]) / size if k + 1 < len(levels) else np.inf
            for e, k, size in zip(errors, level, sizes)]
    i = int(np.argmin(cost))  # ties: the first layer
    if cost[i] == np.inf:  # every layer at the top (sparsity == top, up to rounding)
      break
    level[i] += 1
    reached += step * sizes[i]
  out = levels[level]
  if reached > goal:  # the last layer raised gives back the excess
    out[i] -= (reached - goal) / sizes[i]
  return calibration.paired({l.path: float(np.clip(s, 0.0, top)) for l, s in zip(layers, out)})


def input_sparsity(calibration: Any, thresholds: PyTree) -> dict[str, jax.Array]:
  """The share of each layer's inputs that `thresholds` zero, on `calibration`'s data.

  Give a calibration of held-out data to see the sparsity the thresholds
  reach on it (from its histograms: to within a bin).

  Returns:
    a dict from kernel path to the share, a float32 scalar.
  """
  calibration = _with_histograms("input_sparsity", calibration)
  found = {pytree.path_str(p): t for p, t in pytree.flatten(thresholds)[0] if t is not None}
  out = {}
  for layer in calibration.layers:
    if layer.path not in found:
      continue
    hist = calibration[layer.path].abs_hist
    t = jnp.asarray(found[layer.path], jnp.float32)
    if t.shape != (layer.d_in,):
      raise ValueError(f"input_sparsity: thresholds at {layer.path} have shape {t.shape}; the "
                       f"layer has d_in = {layer.d_in}")
    out[layer.path] = _share_at_or_below(hist, t)
  return out


@jax.jit
def _share_at_or_below(hist: jax.Array, t: jax.Array) -> jax.Array:
  """The share of a layer's input entries with ``|x_j| <= t_j``, from its histograms."""
  counts = hist.sum(-1)
  return jnp.sum(calibration_lib.hist_cdf(hist, t) * counts) / counts.sum()
