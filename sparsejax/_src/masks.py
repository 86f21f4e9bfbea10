"""Masks paired with params: apply, create, inspect.

A masks pytree has the params' structure: a bool array of the param's shape
per sparsified leaf (``True`` = kept) and ``None`` per leaf that stays dense.
Every function here validates that pairing and names the offending leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import scores
from sparsejax._src import ste as ste_lib

PyTree = Any


def _zero_masked(mask: jax.Array, x: Any, ste: bool) -> Any:
  # Maps over an nnx Variable too, keeping the Variable and its metadata.
  if ste:
    return jax.tree.map(lambda a: ste_lib.masked_weight(a, mask), x)
  return jax.tree.map(lambda a: jnp.where(mask, a, jnp.zeros((), a.dtype)), x)


def apply_masks(params: PyTree, masks: PyTree, *, ste: bool = False) -> PyTree:
  """Params with the pruned entries set to exactly zero.

  Args:
    params: a pytree of arrays (flax linen params, ``nnx.state(model)``, ...).
    masks: a masks pytree for `params`, as `get_masks` or `init_masks` return.
    ste: use the straight-through primitive `masked_weight`, so gradients
      reach pruned entries too. Methods that keep params dense (`n_m`) need
      this in the forward pass; the optimizer then applies their estimator.

  Returns:
    a pytree like `params`; dense leaves (``None`` in `masks`) are returned
    unchanged.

  Raises:
    ValueError: if `masks` does not pair with `params` (structure, shape, dtype).

  Example:
    >>> params = sj.apply_masks(params, sj.get_masks(opt_state))
  """
  pytree.check_masks(masks, params)
  return jax.tree.map(lambda m, p: p if m is None else _zero_masked(pytree.unwrap(m), p, ste),
                      masks, params, is_leaf=lambda x: x is None or pytree.is_variable(x))


def init_masks(
    params: PyTree,
    sparsity: float,
    *,
    key: jax.Array,
    distribution: distributions.DistributionLike = "erk",
    where: pytree.Where | str | Sequence[str] | None = None,
    granularity: granularities.Granularity = None,
) -> PyTree:
  """Random masks with an exact number of kept entries per leaf.

  Args:
    params: the params to mask.
    sparsity: target sparsity, a float in [0, 1).
    key: a JAX PRNG key.
    distribution: "erk" (default), "uniform", "global", or a distribution instance.
    where: which leaves to sparsify: a callable ``(path, leaf) -> bool``, a path
      pattern, or None for floating leaves with ndim >= 2.
    granularity: None (entries), `sj.Block(...)` or `sj.Channel(...)`.

  Returns:
    a masks pytree for `params`.

  Example:
    >>> masks = sj.init_masks(params, 0.9, key=jax.random.key(0))
    >>> params = sj.apply_masks(params, masks)
  """
  schedules.constant(sparsity, "sparsity", "init_masks")
  _checks.key(key)
  template = pytree.full_masks(params, where)
  return distributions.masks_from_scores(scores.random_scores(template, key), sparsity,
                                         distribution=distribution, granularity=granularity)


def mask_flips(old: PyTree, new: PyTree) -> jax.Array:
  """How many mask entries differ between two masks pytrees (int32).

  Example:
    >>> sj.mask_flips(sj.get_masks(old_state), sj.get_masks(new_state))
  """
  flips = jax.tree.map(lambda a, b: jnp.sum(a != b, dtype=jnp.int32), old, new)
  return sum(jax.tree.leaves(flips), jnp.int32(0))


def summary(params: PyTree, masks: PyTree | None = None) -> str:
  """A per-leaf table of shape, size, nonzeros and density, with totals.

  Nonzeros are counted in `params` itself, so the table shows what a model
  really holds. Leaves that `masks` marks as dense are flagged.

  Args:
    params: concrete params (call outside `jax.jit`).
    masks: optional masks for `params`.

  Returns:
    the table as a string.

  Example:
    >>> print(sj.summary(params, sj.get_masks(opt_state)))
  """
  leaves, _ = pytree.flatten(params)
  if masks is not None:
    pytree.check_masks(masks, params)
    mask_leaves = [m for _, m in pytree.flatten(masks)[0]]
  else:
    mask_leaves = [None] * len(leaves)
  rows = []
  totals = {"sparse": [0, 0], "all": [0, 0]}
  for (path, leaf), mask in zip(leaves, mask_leaves):
    if leaf is None:
      continue
    a = np.asarray(pytree.unwrap(leaf))
    nnz = int(np.count_nonzero(a))
    kind = "dense" if masks is not None and mask is None else "sparse" if masks is not None else ""
    rows.append((pytree.path_str(path) or "<root>", str(a.shape), a.size, nnz,
                 nnz / max(a.size, 1), kind))
    totals["all"][0] += a.size
    totals["all"][1] += nnz
    if kind == "sparse":
      totals["sparse"][0] += a.size
      totals["sparse"][1] += nnz
  width = max([len(r[0]) for r in rows] + [len('total (sparsified leaves)')])
  head = f"{'leaf':<{width}}  {'shape':>14}  {'size':>10}  {'nnz':>10}  {'density':>7}  kind"
  lines = [head, "-" * len(head)]
  for name, shape, size, nnz, density, kind in rows:
    lines.append(f"{name:<{width}}  {shape:>14}  {size:>10}  {nnz:>10}  {density:>7.4f}  {kind}")
  lines.append("-" * len(head))
  names = [("sparse", "total (sparsified leaves)")] if masks is not None else []
  for key, label in names + [("all", "total (all leaves)")]:
    size, nnz = totals[key]
    lines.append(f"{label:<{width}}  {'':>14}  {size:>10}  {nnz:>10}  {nnz / max(size, 1):>7.4f}")
  return "\n".join(lines)
