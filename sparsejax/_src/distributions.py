"""How a global sparsity is split over the sparsified leaves.

A distribution turns one sparsity (a traced scalar, so schedules and
`optax.inject_hyperparams` work) into an exact number of kept entries per
leaf: ``round((1 - sparsity_l) * size_l)``, computed in float32 with ties to
even. Every distribution takes ``overrides``, a map from path pattern (regex,
`re.search` on ``"a/b/c"``) to a fixed sparsity for the leaves it matches;
those leaves leave the pool that the distribution splits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import granularity as granularities
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import topk


def _check_overrides(overrides: Mapping[str, Any] | None) -> None:
  if overrides is None:
    return
  if not isinstance(overrides, Mapping):
    raise ValueError(f"overrides must map path patterns to sparsities, got {overrides!r}")
  for pattern, sparsity in overrides.items():
    if not isinstance(pattern, str):
      raise ValueError(f"override key {pattern!r} must be a path pattern string")
    pytree.compile_pattern(pattern, "overrides")
    _checks.fraction(f"overrides[{pattern!r}]", sparsity)


def kept(density: jax.Array, size: int) -> jax.Array:
  """``round(density * size)`` in float32, ties to even; exactly 0 and `size` at the ends."""
  density = jnp.clip(density, 0.0, 1.0)
  kept = jnp.round(density * jnp.float32(size)).astype(jnp.int32)
  return jnp.where(density >= 1.0, size, jnp.minimum(kept, size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Distribution:
  overrides: Mapping[str, Any] | None = None

  def __post_init__(self):
    _check_overrides(self.overrides)

  def _split(self, paths, scores, step):
    """Leaves with an override (index -> sparsity), empty leaves, and the pool."""
    names = [pytree.path_str(p) for p in paths]
    fixed: dict[int, jax.Array] = {}
    for pattern, value in (self.overrides or {}).items():
      hits = [i for i, name in enumerate(names) if re.search(pattern, name)]
      if not hits:
        raise ValueError(
            f"overrides pattern {pattern!r} matches no sparsified leaf; "
            f"sparsified leaves: {names}")
      for i in hits:
        fixed.setdefault(i, schedules.as_schedule(value, f"overrides[{pattern!r}]")(step))
    empty = {i for i, a in enumerate(scores) if a.size == 0}
    pool = [i for i in range(len(scores)) if i not in fixed and i not in empty]
    return fixed, empty, pool

  def counts(self, paths: Sequence[pytree.Path], scores: Sequence[jax.Array],
             sparsity: jax.Array, step: jax.Array,
             shapes: Sequence[tuple[int, ...]] | None = None) -> list[jax.Array]:
    """Units to keep per leaf, as int32 scalars.

    `scores` hold one score per unit; `shapes` are the leaves' own shapes
    (they set ERK's densities), by default the scores' shapes.
    """
    shapes = [a.shape for a in scores] if shapes is None else list(shapes)
    fixed, empty, pool = self._split(paths, scores, step)
    out = {i: kept(1.0 - s, scores[i].size) for i, s in fixed.items()}
    out.update((i, jnp.int32(0)) for i in empty)
    if pool:
      pooled = self._pool_counts([scores[i] for i in pool], sparsity, [shapes[i] for i in pool])
      out.update(zip(pool, pooled))
    return [out[i] for i in range(len(scores))]

  def select(self, paths: Sequence[pytree.Path], scores: Sequence[jax.Array],
             sparsity: jax.Array, step: jax.Array,
             shapes: Sequence[tuple[int, ...]] | None = None) -> list[jax.Array]:
    """Masks keeping each leaf's `counts` highest-scoring units."""
    return [topk.topk_mask(a, k) for a, k in
            zip(scores, self.counts(paths, scores, sparsity, step, shapes))]

  def _pool_counts(self, scores, sparsity, shapes):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform(_Distribution):
  """Every sparsified leaf gets the same sparsity.

  Example:
    >>> method = sj.magnitude(0.9, distribution=sj.Uniform(overrides={"head": 0.5}))
  """

  def _pool_counts(self, scores, sparsity, shapes):
    del shapes
    return [kept(1.0 - sparsity, s.size) for s in scores]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ERK(_Distribution):
  """Erdős–Rényi-Kernel: density proportional to ``(sum(shape) / prod(shape)) ** power_scale``.

  Small and thin leaves stay denser. The scale is solved so the pool keeps
  exactly its share of weights; a leaf whose density would exceed 1 is made
  dense and the scale is solved again for the others.

  Reference: Rigging the Lottery: Making All Tickets Winners. Evci, Gale,
  Menick, Castro, Elsen, 2020. arXiv:1911.11134.

  Attributes:
    power_scale: exponent on the ERK ratio; 0 gives uniform, 1 is ERK.
  """

  power_scale: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _checks.static_float("power_scale", self.power_scale)
    if not 0 <= float(self.power_scale) < np.inf:
      raise ValueError(f"power_scale={self.power_scale} must be a finite number >= 0")

  def densities(self, shapes: Sequence[tuple[int, ...]], sparsity: jax.Array) -> list[jax.Array]:
    """ERK densities per leaf for the given shapes, traceable in `sparsity`."""
    if not shapes:
      return []
    sizes = np.array([int(np.prod(s)) for s in shapes], np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], np.float64) ** self.power_scale
    if np.all(raw == raw[0]):  # one ratio for all: uniform, without rounding error
      return [jnp.clip(1.0 - jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)] * len(shapes)
    order = np.argsort(-raw, kind="stable")
    raw_sorted, sizes_sorted = raw[order], sizes[order]
    n_leaves = len(shapes)
    # If the first j leaves (largest ratio) are dense, the others share
    # eps_j = (kept - dense_j) / sum_{i >= j} raw_i * size_i.
    dense_j = np.concatenate([[0.0], np.cumsum(sizes_sorted)])[:n_leaves]
    weight_j = np.cumsum((raw_sorted * sizes_sorted)[::-1])[::-1]
    kept = (1.0 - jnp.asarray(sparsity, jnp.float32)) * np.float32(sizes.sum())
    eps = (kept - dense_j.astype(np.float32)) / weight_j.astype(np.float32)
    valid = eps * raw_sorted.astype(np.float32) <= 1.0 + 1e-6
    # The first valid j; j = n_leaves (all dense) if none is.
    valid = jnp.concatenate([valid, jnp.array([True])])
    j = jnp.argmax(valid)
    eps_j = jnp.concatenate([eps, jnp.zeros(1, jnp.float32)])[j]
    position = np.empty(n_leaves, np.int32)
    position[order] = np.arange(n_leaves)
    return [jnp.where(position[i] < j, 1.0, jnp.minimum(eps_j * np.float32(raw[i]), 1.0))
            for i in range(n_leaves)]

  def _pool_counts(self, scores, sparsity, shapes):
    densities = self.densities(shapes, sparsity)
    return [kept(d, s.size) for d, s in zip(densities, scores)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Global(_Distribution):
  """One score threshold across all pooled leaves, with a per-leaf floor.

  The pool keeps exactly ``round((1 - sparsity) * pool_size)`` entries, those
  with the largest scores over all leaves. Each leaf keeps at least
  ``min(ceil(min_density * size), floor((1 - sparsity) * size))`` entries: at
  least `min_density` of it whenever the global density allows, so no layer
  collapses, and never so many that the total could not be exact.

  Attributes:
    min_density: floor on each leaf's density, in [0, 1].
  """

  min_density: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    _checks.static_float("min_density", self.min_density)
    _checks.fraction("min_density", self.min_density, closed=True, schedule=False)

  def _total_and_floors(self, scores, sparsity):
    sizes = [s.size for s in scores]
    total = kept(1.0 - sparsity, sum(sizes))
    floors = [jnp.minimum(int(np.ceil(self.min_density * n - 1e-9)),
                          jnp.floor((1.0 - sparsity) * np.float32(n)).astype(jnp.int32))
              for n in sizes]
    return total, floors

  def _pool_counts(self, scores, sparsity, shapes):
    del shapes
    return topk.global_counts(scores, *self._total_and_floors(scores, sparsity))

  def select(self, paths, scores, sparsity, step, shapes=None):
    # The pool's masks come straight from the shared threshold; overridden
    # and empty leaves take their own counts.
    fixed, empty, pool = self._split(paths, scores, step)
    out = {i: topk.topk_mask(scores[i], kept(1.0 - s, scores[i].size))
           for i, s in fixed.items()}
    out.update((i, jnp.zeros(scores[i].shape, jnp.bool_)) for i in empty)
    if pool:
      pooled = [scores[i] for i in pool]
      out.update(zip(pool, topk.global_masks(pooled, *self._total_and_floors(pooled, sparsity))))
    return [out[i] for i in range(len(scores))]


Distribution = _Distribution
DistributionLike = Union[str, _Distribution]

_BY_NAME = {"uniform": Uniform, "erk": ERK, "global": Global}


def as_distribution(distribution: DistributionLike) -> _Distribution:
  """A distribution from a name ("uniform", "erk", "global") or an instance."""
  if isinstance(distribution, _Distribution):
    return distribution
  if isinstance(distribution, str) and distribution.lower() in _BY_NAME:
    return _BY_NAME[distribution.lower()]()
  raise ValueError(
      f"unknown distribution {distribution!r}; expected one of "
      f"{sorted(_BY_NAME)} or an instance of sj.Uniform, sj.ERK or sj.Global")


def masks_from_scores(scores: pytree.PyTree, sparsity: schedules.ScalarOrSchedule, *,
                      distribution: DistributionLike = "erk", step: Any = 0,
                      granularity: granularities.Granularity = None) -> pytree.PyTree:
  """Masks keeping the highest-scoring entries, split over leaves by `distribution`.

  Args:
    scores: a pytree of float arrays, ``None`` at leaves that stay dense.
    sparsity: target sparsity over the scored leaves, a float in [0, 1) or a
      schedule evaluated at `step`.
    distribution: "erk" (the default everywhere), "uniform", "global", or an
      `ERK`/`Uniform`/`Global` instance.
    step: the step at which schedules (sparsity, overrides) are evaluated.
    granularity: None for single entries, or `Block`/`Channel`: scores are
      pooled per unit and whole units are kept; counts are in units.

  Returns:
    a masks pytree: bool arrays with exactly the distribution's count of True
    units per leaf (ties to the lower flat index), ``None`` where `scores`
    is ``None``.

  Example:
    >>> scores = jax.tree.map(jnp.abs, params)
    >>> masks = sj.masks_from_scores(scores, 0.9, distribution="uniform")
  """
  dist = as_distribution(distribution)
  leaves, treedef = pytree.flatten(scores)
  scored = [i for i, (_, s) in enumerate(leaves) if s is not None]
  if not scored:
    raise ValueError("scores has no array leaves: there is nothing to mask.")
  paths = [leaves[i][0] for i in scored]
  arrays = []
  for i in scored:
    path, leaf = leaves[i]
    try:
      arrays.append(jnp.asarray(pytree.unwrap(leaf)))
    except TypeError:
      raise ValueError(f"{pytree.describe(path, 'scores')}: scores must be float arrays, got "
                       f"{leaf!r}") from None
  for path, a in zip(paths, arrays):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{pytree.describe(path, 'scores')}: scores must be floating, got {a.dtype}")
  unit = granularities.as_granularity(granularity)
  for path, a in zip(paths, arrays):
    unit.check(path, a.shape)
  units = [unit.pool(a) for a in arrays]
  check_unit_sizes(dist, granularity, paths, arrays, units)
  s = schedules.as_schedule(sparsity)(step)
  selected = dist.select(paths, units, s, step, shapes=[a.shape for a in arrays])
  out = [None] * len(leaves)
  for i, a, m in zip(scored, arrays, selected):
    out[i] = unit.expand(m, a.shape)
  return jax.tree_util.tree_unflatten(treedef, out)


def check_unit_sizes(dist, granularity, paths, arrays, units) -> None:
  """A global ranking compares units, so they must be of one size."""
  sizes = [a.size // max(u.size, 1) for a, u in zip(arrays, units)]
  if isinstance(dist, Global) and len({n for n, u in zip(sizes, units) if u.size}) > 1:
    raise ValueError(
        "the Global distribution ranks units against each other, so they must be of one "
        f"size; with {granularity} the leaves' units differ ("
        + ", ".join(f"{pytree.path_str(p)}: {n} entries" for p, n in zip(paths, sizes))
        + "). Use 'uniform' or 'erk'.")
