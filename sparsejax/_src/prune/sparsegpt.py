"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import calibration as calibration_lib
from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import n_m_masks
from sparsejax._src.prune import common

_HIGHEST = lax.Precision.HIGHEST


def _chunk_counts(sparsity, rows: int, block: int, units_per_row: int, per_row: int):
  """Units kept per chunk of `block` rows: cumulative rounding, so the chunks sum exactly."""
  edges = np.minimum(np.arange(0, -(-rows // block) + 1) * block, rows) // per_row
  cum = [distributions.kept(1.0 - sparsity, int(e) * units_per_row) if e else jnp.int32(0)
         for e in edges]
  return jnp.stack([b - a for a, b in zip(cum[:-1], cum[1:])])


@functools.partial(jax.jit, static_argnames=("pattern", "group", "block_size"))
def sparsegpt_matrix(w, gram, sparsity, dampening, *, pattern, group, block_size):
  """SparseGPT on one [d_in, d_out] matrix with input Gram matrix `gram`; returns (mask, w).

  Inputs are processed in chunks of `block_size` rows: at the start of a
  chunk (of each N:M group, for N:M) the mask is chosen by ``w^2 /
  [H^-1]_jj^2`` with the chunk's share of the count, then each input row is
  pruned in turn and its error spread over the later rows through the
  Cholesky factor of ``H^-1`` (lazily, chunk by chunk, as in the paper).
  """
  d_in, d_out = w.shape
  w = w.astype(jnp.float32)
  h = gram.astype(jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0  # inputs never active: their weights cannot matter
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[:, None], 0.0, w)
  h = h + jnp.eye(d_in, dtype=jnp.float32) * (dampening * jnp.mean(jnp.diagonal(h)))
  b = min(block_size, d_in)
  size = -(-d_in // b) * b
  pad = size - d_in
  if pad:  # padded inputs are uncoupled and never kept
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(size) >= d_in).astype(h.dtype)
    w = jnp.pad(w, ((0, pad), (0, 0)))
  # The upper Cholesky factor u of H^-1 (H^-1 = u.T @ u) without forming H^-1: with J the
  # reversal, chol(J H J) = M gives H = R R.T for the upper R = J M J, and u = R^-1.
  r = jnp.flip(jnp.linalg.cholesky(jnp.flip(h, (0, 1))), (0, 1))
  u = jax.scipy.linalg.solve_triangular(r, jnp.eye(size, dtype=jnp.float32), lower=False)
  real = jnp.arange(size) < d_in
  n_m = isinstance(pattern, tuple)
  block = pattern if isinstance(pattern, granularities.Block) else None
  if not n_m:
    unit_rows = block.block_shape[0] if block else 1
    units_per_row = 1 if group == "output" else (d_out // block.block_shape[1] if block else d_out)
    counts = _chunk_counts(sparsity, d_in, b, units_per_row, unit_rows)

  def chunk(c, carry):
    w, mask = carry
    i1 = c * b
    w1 = lax.dynamic_slice(w, (i1, 0), (b, d_out))
    u1 = lax.dynamic_slice(u, (i1, i1), (b, b))
    d1 = jnp.diagonal(u1)
    real1 = lax.dynamic_slice(real, (i1,), (b,))
    if n_m:
      mask1 = jnp.zeros((b, d_out), jnp.bool_)
    else:
      scores = jnp.where(real1[:, None], w1 ** 2 / d1[:, None] ** 2, -jnp.inf)
      mask1 = common.select_count(scores, counts[c], pattern, group)

    def column(i, inner):
      # Row i as updated by the errors of rows < i of this chunk: w1[i] - u1[:i, i] @ err1[:i]
      # (err1 is zero from row i on), so no per-column rewrite of the whole chunk.
      mask1, err1, kept1 = inner
      if n_m:
        n, m = pattern
        start = (i // m) * m

        def choose(mask1):
          rows = (lax.dynamic_slice(w1, (start, 0), (m, d_out))
                  - jnp.dot(lax.dynamic_slice(u1, (0, start), (b, m)).T, err1, precision=_HIGHEST))
          group_d = lax.dynamic_slice(d1, (start,), (m,))
          chosen = n_m_masks.n_m_mask(rows ** 2 / group_d[:, None] ** 2, n, m, axis=0)
          return lax.dynamic_update_slice(mask1, chosen, (start, 0))

        mask1 = lax.cond(i % m == 0, choose, lambda mask1: mask1, mask1)
      row = w1[i] - jnp.dot(u1[:, i], err1, precision=_HIGHEST)
      kept = jnp.where(mask1[i], row, 0.0)
      err = (row - kept) / d1[i]
      return mask1, err1.at[i].set(err), kept1.at[i].set(kept)

    zeros = jnp.zeros((b, d_out), jnp.float32)
    mask1, err1, w1 = lax.fori_loop(0, b, column, (mask1, zeros, zeros))
    w = lax.dynamic_update_slice(w, w1, (i1, 0))
    later = (jnp.arange(size) >= i1 + b)[:, None]
    rows = lax.dynamic_slice(u, (i1, 0), (b, size))
    w = w - jnp.where(later, jnp.dot(rows.T, err1, precision=_HIGHEST), 0.0)
    return w, lax.dynamic_update_slice(mask, mask1, (i1, 0))

  w, mask = lax.fori_loop(0, size // b, chunk, (w, jnp.zeros((size, d_out), jnp.bool_)))
  return mask[:d_in], jnp.where(mask, w, 0.0)[:d_in]


def sparsegpt(
    params: Any,
    calibration: calibration_lib.Calibration,
    *,
    sparsity: Any = None,
    pattern: Any = None,
    group: str = "output",
    sequential: bool = True,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[Any, Any]:
  """SparseGPT: prune each layer one-shot and update its remaining weights.

  Per layer, with ``H = X^T X`` from the calibration (float32 whatever the
  params' dtype), ``H + dampening * mean(diag(H)) * I`` is inverted through
  its Cholesky factor; inputs are pruned in chunks of `block_size`, and every
  pruned weight's error is compensated on the weights of later inputs (the
  optimal-brain-surgeon update). Inputs that were never active are pruned
  first at no cost.

  Reference: SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot. Frantar & Alistarh, 2023. arXiv:2301.00774.

  Args:
    params: the calibrated nnx Module, or its params.
    calibration: from `sj.calibrate` (with ``gram=True``, the default).
    sparsity: a float in [0, 1), or per-layer sparsities (`sj.prune.owl`).
    pattern: None (unstructured), ``(n, m)`` or ``sj.Block((bi, bo))``.
    group: "output" or "layer": where counts are exact (chunk by chunk, they
      add up to the exact total).
    sequential: recalibrate each layer on the outputs of the pruned and
      updated layers before it (True, as in the paper), or use
      `calibration`'s statistics as they are (False).
    block_size: inputs per chunk (rounded down to a multiple of m, or of the
      tile rows, and at most d_in).
    dampening: fraction of the mean diagonal added to ``H``; > 0 unless
      ``H`` is known to be positive definite.

  Returns:
    ``(masks, params)``: the masks (bool at calibrated kernels, None
    elsewhere) and the params with pruned weights exactly zero and the others
    updated, in the structure given (for a Module: ``nnx.state(model,
    nnx.Param)``; load with ``nnx.update(model, params)``).

  Example:
    >>> masks, params = sj.prune.sparsegpt(model, calibration, pattern=(2, 4))
    >>> nnx.update(model, params)
  """
  owner = "sj.prune.sparsegpt"
  pattern = common.check_rule(owner, sparsity, pattern, group)
  calibration_lib.check_calibration(owner, calibration)
  block_size = _checks.static_int("block_size", block_size, minimum=1)
  _checks.static_float("dampening", dampening)
  if not dampening >= 0:
    raise ValueError(f"dampening={dampening} must be >= 0")
  unit = pattern[1] if isinstance(pattern, tuple) else (
      pattern.block_shape[0] if pattern is not None else 1)
  if not calibration.has_gram:
    raise ValueError(f"{owner}: needs X^T X; calibrate with gram=True (the default)")

  def prune_layer(layer, w, stats, s, mask):
    del mask
    b = min(block_size, layer.d_in)
    if b % unit:
      b = unit * max(b // unit, 1)
    new_mask, new_w = sparsegpt_matrix(w, stats.gram, s, jnp.float32(dampening),
                                       pattern=pattern, group=group, block_size=b)
    if not bool(jnp.all(jnp.isfinite(new_w))):
      raise ValueError(
          f"{owner}: the Hessian X^T X of layer {layer.path} is singular (its Cholesky "
          f"factorization failed with dampening={dampening}); pass dampening > 0, e.g. 0.01, "
          "or calibrate on more tokens")
    return new_mask, new_w

  return common.run(owner, params, calibration, prune_layer, sparsity=sparsity,
                    pattern=pattern, sequential=sequential)
