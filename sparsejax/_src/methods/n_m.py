"""N:M structured sparsity trained with dense shadow weights and a straight-through estimator.

`n_m` recomputes an exact N:M mask from the dense weights' magnitudes; the
forward pass applies it with ``sj.apply_masks(params, masks, ste=True)`` and
the optimizer turns the straight-through gradient into the chosen
estimator's. The mask algorithms live in `n_m_masks`, the storage format in
`sparsejax.matmul`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src import masks as masks_lib
from sparsejax._src import n_m_masks
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import sparsify

ESTIMATORS = ("hard", "ste", "sr_ste", "decay")


class NMState(NamedTuple):
  """Method state of `n_m`.

  Attributes:
    flips: mask entries that changed at the last update, over all leaves (the
      sparse architecture divergence between consecutive masks).
  """

  flips: jax.Array


def n_m(
    n: int | Callable[[jax.Array], jax.Array],
    m: int,
    *,
    axis: int = n_m_masks.DEFAULT_AXIS,
    estimator: str = "sr_ste",
    decay: float | schedules.Schedule | None = None,
    grad_scale: float | schedules.Schedule | None = None,
    update_every: int = 1,
    transposable: bool = False,
    granularity: None = None,
) -> sparsify.SparsityMethod:
  """N:M sparsity trained with dense shadow weights and a straight-through estimator.

  Params stay dense (do not zero them with `apply_masks` yourself): the
  forward pass must see ``sj.apply_masks(params, masks, ste=True)``, and
  ``sj.sparse_params(params, opt_state)`` exports the final N:M weights.
  After every `update_every` optimizer steps the mask is recomputed from the
  dense weights' magnitudes, exactly `n` of every
  `m` along `axis` (for a Dense kernel ``(in, out)``, ``axis=-2`` groups the
  inputs of each output, the layout sparse tensor cores use). The estimator
  sets what pruned weights learn:

  - ``"hard"``: nothing;
  - ``"ste"``: the straight-through gradient;
  - ``"sr_ste"``: that plus ``decay * w`` (SR-STE; default ``decay=2e-4``);
  - ``"decay"``: the straight-through gradient (plus ``decay * w``) scaled by
    `grad_scale`, a schedule going to 0 (decayed gradient flow). Pair it with a
    ramp in `n` (`sj.piecewise`) for the structure-decay variant.

  References: Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch. Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun, Li, 2021. arXiv:2102.04010.
  Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers.
  Bambhaniya, Yazdanbakhsh, Subramanian, Kao, Agrawal, Hanumolu, Krishna, 2024.
  arXiv:2402.04744.

  Args:
    n: kept per group, an int or a schedule ``step -> int`` (an N:M ramp).
    m: group size.
    axis: axis of every sparsified leaf along which groups run (default -2,
      as everywhere N:M appears).
    estimator: "hard", "ste", "sr_ste" or "decay".
    decay: SR-STE's coefficient (float or schedule) for "sr_ste" and "decay".
    grad_scale: for "decay", the schedule scaling pruned weights' gradient,
      e.g. ``optax.linear_schedule(1.0, 0.0, 10_000)``.
    update_every: steps between mask recomputations, >= 1.
    transposable: make masks N:M along the last two axes at once, so ``W`` and
      ``W.T`` are both N:M (fixed `n`, `m` <= 5).
    granularity: None only (the N:M group is the unit).

  Returns:
    a `SparsityMethod` for `sparsify` that keeps params dense.

  Example:
    >>> method = sj.n_m(2, 4, axis=-2, estimator="sr_ste", decay=2e-4)
    >>> tx = sj.sparsify(optax.adam(1e-3), method)
    >>> def loss_fn(params, batch):
    ...   sparse = sj.apply_masks(params, sj.get_masks(state), ste=True)
    ...   ...
  """
  _checks.static("m", m, "n_m")
  _checks.n_m(n, m)
  _checks.choice("estimator", estimator, ESTIMATORS)
  if estimator in ("hard", "ste") and decay is not None:
    raise ValueError(f"decay applies to the sr_ste and decay estimators, not {estimator!r}")
  if estimator == "decay" and grad_scale is None:
    raise ValueError("estimator='decay' needs grad_scale, a schedule going to 0, e.g. "
                     "optax.linear_schedule(1.0, 0.0, total_steps)")
  if estimator != "decay" and grad_scale is not None:
    raise ValueError(f"grad_scale applies to the decay estimator, not {estimator!r}")
  should_update = schedules.update_steps(update_every=update_every)
  if not _checks.is_int(axis):
    raise ValueError(f"axis={axis!r} must be an integer")
  if granularity is not None:
    raise ValueError(f"n_m: granularity={granularity!r} is not supported: the N:M group along "
                     "`axis` is the unit; use granularity=None")
  if transposable:
    n_m_masks.check_transposable(n, m)
  n_at = (lambda step: jnp.round(jnp.asarray(n(step))).astype(jnp.int32)) if callable(n) else (
      lambda step: jnp.asarray(n, jnp.int32))
  as_fn = lambda x: x if callable(x) else (lambda step: jnp.asarray(x, jnp.float32))
  decay_at = as_fn(2e-4 if decay is None and estimator == "sr_ste" else (decay or 0.0))
  scale_at = as_fn({"hard": 0.0, "ste": 1.0, "sr_ste": 1.0}.get(estimator, grad_scale))

  def masks_for(params, step):
    leaves, treedef = pytree.flatten(params)
    out = []
    for path, w in leaves:
      if w is None:
        out.append(None)
      elif transposable:
        out.append(n_m_masks.transposable_n_m_mask(jnp.abs(w), n, m))
      else:
        n_m_masks.group_axis(w.shape, m, axis, pytree.describe(path))
        out.append(n_m_masks.n_m_mask(jnp.abs(w), n_at(step), m, axis=axis))
    return jax.tree_util.tree_unflatten(treedef, out)

  def init(params):
    return masks_for(params, 0), NMState(jnp.int32(0))

  def update(masks, state, params, grads, step):
    del grads, state
    new = masks_for(params, step)
    return new, NMState(masks_lib.mask_flips(masks, new))

  def estimate(grads, masks, params, step):
    scale, lam = scale_at(step), decay_at(step)
    if estimator == "decay":
      lam = lam * scale
    return jax.tree.map(
        lambda g, mk, w: jnp.where(mk, g, (scale * g + lam * w).astype(g.dtype)),
        grads, masks, params)

  return sparsify.SparsityMethod(init=init, update=update, should_update=should_update,
                                 dense_params=True, estimate_grads=estimate)
