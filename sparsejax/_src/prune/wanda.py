"""Wanda and magnitude: one-shot masks from a score per weight, without weight updates."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src import calibration as calibration_lib
from sparsejax._src.prune import common


@functools.partial(jax.jit, static_argnames=("pattern", "group", "activations"))
def _layer_mask(w, norms, sparsity, *, pattern, group, activations):
  scores = jnp.abs(w) * norms[:, None] if activations else jnp.abs(w)
  return common.select(scores, sparsity, pattern, group)


def _score_rule(owner, params, calibration, sparsity, pattern, group, sequential, *,
                activations):
  """Masks from ``|W|`` (times ``||X_j||`` with `activations`), no weight update."""
  pattern = common.check_rule(owner, sparsity, pattern, group)
  calibration_lib.check_calibration(owner, calibration)

  def prune_layer(layer, w, stats, s, mask):
    del layer, mask
    return _layer_mask(w, stats.norms(), s, pattern=pattern, group=group,
                       activations=activations), None

  return common.run(owner, params, calibration, prune_layer, sparsity=sparsity,
                    pattern=pattern, sequential=sequential)[0]


def wanda(
    params: Any,
    calibration: calibration_lib.Calibration,
    *,
    sparsity: Any = None,
    pattern: Any = None,
    group: str = "output",
    sequential: bool = True,
) -> Any:
  """Wanda: prune the weights with the smallest ``|W_ij| * ||X_j||``.

  Weights are compared per output (``group="output"``, the paper's choice) or
  over the layer. No weight is updated.

  Reference: A Simple and Effective Pruning Approach for Large Language
  Models. Sun, Liu, Bair, Kolter, 2024. arXiv:2306.11695.

  Args:
    params: the calibrated nnx Module, or its params (``nnx.state(model,
      nnx.Param)``, or a linen ``variables["params"]``).
    calibration: from `sj.calibrate`.
    sparsity: a float in [0, 1), or per-layer sparsities (`sj.prune.owl`).
    pattern: None (unstructured), an N:M pair ``(n, m)`` or ``sj.Block((bi, bo))``.
    group: "output" or "layer": where counts are exact.
    sequential: recalibrate each layer on the outputs of the layers before it,
      already pruned (True, as in the paper's code), or use the statistics of
      `calibration` as they are (False: one pass).

  Returns:
    masks: bool at every calibrated kernel, None elsewhere (the params' structure).

  Example:
    >>> masks = sj.prune.wanda(model, sj.calibrate(model, batches), sparsity=0.5)
    >>> params = sj.apply_masks(nnx.state(model, nnx.Param), masks)
  """
  return _score_rule("sj.prune.wanda", params, calibration, sparsity, pattern, group,
                     sequential, activations=True)


def magnitude(
    params: Any,
    calibration: calibration_lib.Calibration,
    *,
    sparsity: Any = None,
    pattern: Any = None,
    group: str = "output",
) -> Any:
  """One-shot magnitude pruning of the calibrated layers, with Wanda's counts.

  The baseline of the post-training rules: the same layers, patterns and
  groups as `wanda`, scored by ``|W_ij|`` alone (the calibration only names
  the layers). For magnitude pruning during training use `sj.magnitude`.

  Args:
    params: the calibrated nnx Module or its params.
    calibration: from `sj.calibrate` (its statistics are not used).
    sparsity: a float in [0, 1), or per-layer sparsities.
    pattern: None, ``(n, m)`` or ``sj.Block((bi, bo))``.
    group: "output" or "layer".

  Returns:
    masks: bool at every calibrated kernel, None elsewhere.

  Example:
    >>> masks = sj.prune.magnitude(model, calibration, pattern=(2, 4))
  """
  return _score_rule("sj.prune.magnitude", params, calibration, sparsity, pattern, group,
                     False, activations=False)
