"""N:M structured sparsity: N kept weights in every group of M along an axis.

`n_m` keeps dense ("shadow") weights and recomputes an exact N:M mask from
their magnitudes; the forward pass applies it with
``sj.apply_masks(params, masks, ste=True)`` and the optimizer turns the
straight-through gradient into the chosen estimator's. `compress_n_m` stores
N:M weights as values plus in-group indices, and `n_m_matmul` multiplies with
them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src import sparsify
from sparsejax._src import topk

ESTIMATORS = ("hard", "ste", "sr_ste", "decay")
_MAX_TRANSPOSABLE_M = 5


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_n_m(n: Any, m: int) -> None:
  if not _is_int(m) or m < 1:
    raise ValueError(f"m={m!r} must be an integer >= 1")
  if callable(n) or not schedules.is_concrete(n):
    return
  try:
    ok = np.ndim(n) == 0 and not isinstance(n, (str, bytes)) and float(n).is_integer()
  except (TypeError, ValueError):
    ok = False
  if not ok or not 0 <= int(n) <= m:
    raise ValueError(f"n={n!r} must be an integer with 0 <= n <= m={m}")


def _check_axis(axis: Any) -> None:
  if not _is_int(axis):
    raise ValueError(f"axis={axis!r} must be an integer")


def _check_transposable(n: Any, m: int) -> None:
  if m > _MAX_TRANSPOSABLE_M:
    raise ValueError(f"transposable {n}:{m} masks are searched exactly over all patterns, which "
                     f"supports m <= {_MAX_TRANSPOSABLE_M}; got m={m}")


def _check_leaf(path: pytree.Path, shape: tuple[int, ...], m: int, axis: int,
                root: str = "params") -> int:
  _check_axis(axis)
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"axis={axis} is out of range for {pytree.describe(path, root)} of shape "
                     f"{shape}")
  axis %= len(shape)
  if shape[axis] % m:
    raise ValueError(f"m={m} does not divide axis {axis} (length {shape[axis]}) of "
                     f"{pytree.describe(path, root)} of shape {shape}")
  return axis


def n_m_mask(scores: jax.Array, n: jax.Array | int, m: int, axis: int = -1) -> jax.Array:
  """Exact N:M mask: the `n` largest scores of every `m` consecutive entries along `axis`.

  Ties go to the lower index, NaN ranks lowest (as in `topk_mask`). `n` may be
  traced, so an N:M ramp (4:4 -> 2:4 -> 1:4) needs no recompilation.

  Example:
    >>> mask = sj.n_m_mask(jnp.abs(w), 2, 4, axis=0)   # 2:4 along the input dim
  """
  _check_n_m(n, m)
  scores = jnp.asarray(scores)
  axis = _check_leaf((), scores.shape, m, axis, root="scores")
  moved = jnp.moveaxis(scores, axis, -1)
  key = topk.keys(moved).reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  index = jnp.arange(m)
  # rank_i = #{j : key_j > key_i, or key_j == key_i and j < i}
  other, this = key[..., None, :], key[..., :, None]
  earlier = jnp.broadcast_to(index[None, :] < index[:, None], key.shape + (m,))
  beats = (other > this) | ((other == this) & earlier)
  rank = jnp.sum(beats, axis=-1)
  mask = (rank < jnp.asarray(n, jnp.int32)).reshape(moved.shape)
  return jnp.moveaxis(mask, -1, axis)


@functools.lru_cache(maxsize=None)
def _transposable_patterns(n: int, m: int) -> np.ndarray:
  """All m x m 0/1 matrices with n ones in every row and every column (m <= 5).

  Cached: leaves and traces with the same n:m share one enumeration.
  """
  rows = [np.array(c) for c in itertools.combinations(range(m), n)]
  patterns = []
  for choice in itertools.product(rows, repeat=m):
    p = np.zeros((m, m), bool)
    for r, cols in enumerate(choice):
      p[r, cols] = True
    if np.all(p.sum(0) == n):
      patterns.append(p)
  patterns = np.stack(patterns)
  patterns.setflags(write=False)  # shared through the cache
  return patterns


def transposable_n_m_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  """An N:M mask along both of the last two axes, keeping the most total score.

  Every ``m x m`` tile of the last two dims gets the pattern with ``n`` kept
  entries per row and per column that has the largest score sum (an exact
  search over all such patterns), so both ``W`` and ``W.T`` are N:M.

  Example:
    >>> mask = sj.transposable_n_m_mask(jnp.abs(w), 2, 4)
  """
  if callable(n) or not schedules.is_concrete(n):
    raise ValueError("transposable masks need a fixed integer n, not a schedule or a traced value")
  _check_n_m(n, m)
  _check_transposable(n, m)
  scores = jnp.asarray(scores)
  if scores.ndim < 2 or scores.shape[-1] % m or scores.shape[-2] % m:
    raise ValueError(f"transposable {n}:{m} needs the last two dims of {scores.shape} "
                     f"to be multiples of m={m}")
  patterns = _transposable_patterns(int(n), m)
  lead, r, c = scores.shape[:-2], scores.shape[-2], scores.shape[-1]
  tiles = scores.reshape(lead + (r // m, m, c // m, m)).astype(jnp.float32)
  tiles = jnp.where(jnp.isnan(tiles), -jnp.inf, tiles)
  value = jnp.einsum("...aibj,kij->...abk", tiles, patterns.astype(np.float32))
  best = jnp.argmax(value, axis=-1)  # first best pattern on ties
  chosen = jnp.asarray(patterns)[best]  # (..., r/m, c/m, m, m)
  return jnp.swapaxes(chosen, -3, -2).reshape(scores.shape)


def piecewise(values: dict[int, Any]) -> Callable[[jax.Array], jax.Array]:
  """A step schedule: ``values[b]`` from step ``b`` on (e.g. an N:M ramp).

  Example:
    >>> n = sj.piecewise({0: 4, 1000: 2, 2000: 1})   # 4:4 -> 2:4 -> 1:4
    >>> method = sj.n_m(n, 4)
  """
  if not values or min(values) != 0:
    raise ValueError(f"piecewise needs a value from step 0, got steps {sorted(values)}")
  steps = sorted(values)

  def schedule(step):
    out = jnp.asarray(values[steps[0]])
    for b in steps[1:]:
      out = jnp.where(jnp.asarray(step) >= b, values[b], out)
    return out

  return schedule


class NMState(NamedTuple):
  """Method state of `n_m`.

  Attributes:
    flips: mask entries that changed at the last update, over all leaves (the
      sparse architecture divergence between consecutive masks).
  """

  flips: jax.Array


def mask_flips(old: pytree.PyTree, new: pytree.PyTree) -> jax.Array:
  """How many mask entries differ between two masks pytrees (int32)."""
  flips = jax.tree.map(lambda a, b: jnp.sum(a != b, dtype=jnp.int32), old, new)
  return sum(jax.tree.leaves(flips), jnp.int32(0))


def n_m(
    n: int | Callable[[jax.Array], jax.Array],
    m: int,
    *,
    axis: int = -2,
    estimator: str = "sr_ste",
    decay: float | schedules.Schedule | None = None,
    grad_scale: float | schedules.Schedule | None = None,
    update_every: int = 1,
    transposable: bool = False,
) -> sparsify.SparsityMethod:
  """N:M sparsity trained with dense shadow weights and a straight-through estimator.

  Params stay dense (do not zero them with `apply_masks` yourself): the
  forward pass must see ``sj.apply_masks(params, masks, ste=True)``, and
  ``sj.sparse_params(params, opt_state)`` exports the final N:M weights. Every `update_every` steps the
  mask is recomputed from the dense weights' magnitudes, exactly `n` of every
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
    axis: axis of every sparsified leaf along which groups run.
    estimator: "hard", "ste", "sr_ste" or "decay".
    decay: SR-STE's coefficient (float or schedule) for "sr_ste" and "decay".
    grad_scale: for "decay", the schedule scaling pruned weights' gradient,
      e.g. ``optax.linear_schedule(1.0, 0.0, 10_000)``.
    update_every: steps between mask recomputations, >= 1.
    transposable: make masks N:M along the last two axes at once, so ``W`` and
      ``W.T`` are both N:M (fixed `n`, `m` <= 5).

  Returns:
    a `SparsityMethod` for `sparsify` that keeps params dense.

  Example:
    >>> method = sj.n_m(2, 4, axis=-2, estimator="sr_ste", decay=2e-4)
    >>> tx = sj.sparsify(optax.adam(1e-3), method)
    >>> def loss_fn(params, batch):
    ...   sparse = sj.apply_masks(params, sj.get_masks(state), ste=True)
    ...   ...
  """
  _check_n_m(n, m)
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
  if estimator in ("hard", "ste") and decay is not None:
    raise ValueError(f"decay applies to the sr_ste and decay estimators, not {estimator!r}")
  if estimator == "decay" and grad_scale is None:
    raise ValueError("estimator='decay' needs grad_scale, a schedule going to 0, e.g. "
                     "optax.linear_schedule(1.0, 0.0, total_steps)")
  if estimator != "decay" and grad_scale is not None:
    raise ValueError(f"grad_scale applies to the decay estimator, not {estimator!r}")
  schedules.check_positive_int("update_every", update_every)
  _check_axis(axis)
  if transposable and callable(n):
    raise ValueError("transposable masks need a fixed n, not a schedule")
  if transposable:
    _check_transposable(n, m)
  n_at = n if callable(n) else (lambda step: jnp.asarray(n, jnp.int32))
  as_fn = lambda x: x if callable(x) else (lambda step: jnp.asarray(x, jnp.float32))
  decay_at = as_fn(2e-4 if decay is None and estimator == "sr_ste" else (decay or 0.0))
  scale_at = as_fn({"hard": 0.0, "ste": 1.0, "sr_ste": 1.0}.get(estimator, grad_scale))

  def masks_for(params, step):
    leaves, treedef = pytree.flatten(params)
    out = []
    for path, w in leaves:
      if w is None:
        out.append(None)
        continue
      s = jnp.abs(w)
      if transposable:
        out.append(transposable_n_m_mask(s, n, m))
      else:
        out.append(n_m_mask(s, n_at(step), m, _check_leaf(path, w.shape, m, axis)))
    return jax.tree_util.tree_unflatten(treedef, out)

  def init(params):
    return masks_for(params, jnp.int32(0)), NMState(jnp.int32(0))

  def update(masks, state, params, grads, step):
    del grads, state
    new = masks_for(params, step)
    return new, NMState(mask_flips(masks, new))

  def estimate(grads, masks, params, step):
    scale, lam = scale_at(step), decay_at(step)
    if estimator == "decay":
      lam = lam * scale
    return jax.tree.map(
        lambda g, mk, w: jnp.where(mk, g, (scale * g + lam * w).astype(g.dtype)),
        grads, masks, params)

  return sparsify.SparsityMethod(
      init=init, update=update, should_update=lambda step: step % update_every == 0,
      dense_params=True, estimate_grads=estimate)


class NMCompressed(NamedTuple):
  """N:M weights stored compactly (a pytree).

  Attributes:
    values: the kept weights, ``n`` per group, groups along the last axis of
      ``w`` moved to `axis` last: shape ``(..., length // m * n)``.
    indices: int8 position of each kept weight inside its group, same shape.
  """

  values: jax.Array
  indices: jax.Array


def compress_n_m(w: jax.Array, n: int, m: int, axis: int = -2,
                 mask: jax.Array | None = None) -> NMCompressed:
  """Values and in-group indices of an N:M matrix (its mask from magnitudes by default).

  Example:
    >>> c = sj.compress_n_m(w, 2, 4, axis=0)
    >>> np.testing.assert_array_equal(sj.decompress_n_m(c, w.shape, 2, 4, axis=0), w * mask)
  """
  _check_n_m(n, m)
  w = jnp.asarray(w)
  axis = _check_leaf((), w.shape, m, axis, root="w")
  if mask is None:
    mask = n_m_mask(jnp.abs(w), n, m, axis)
  elif jnp.shape(mask) != w.shape or jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f"mask must be bool of the shape of w {w.shape}, got "
                     f"{jnp.result_type(mask)} of shape {jnp.shape(mask)}")
  moved_w, moved_m = jnp.moveaxis(w, axis, -1), jnp.moveaxis(mask, axis, -1)
  groups = moved_w.shape[:-1] + (moved_w.shape[-1] // m, m)
  gw, gm = moved_w.reshape(groups), moved_m.reshape(groups)
  check = jnp.sum(gm, axis=-1)
  if not isinstance(check, jax.core.Tracer) and bool(jnp.any(check != n)):
    raise ValueError(f"mask is not {n}:{m} along axis {axis}")
  # Kept positions first, in order: a stable sort on "not kept".
  order = jnp.argsort(~gm, axis=-1, stable=True)[..., :n]
  values = jnp.take_along_axis(gw, order, axis=-1)
  return NMCompressed(values.reshape(groups[:-2] + (-1,)),
                      order.astype(jnp.int8).reshape(groups[:-2] + (-1,)))


def decompress_n_m(c: NMCompressed, shape: tuple[int, ...], n: int, m: int,
                   axis: int = -2) -> jax.Array:
  """The dense matrix of `compress_n_m`, zeros at pruned entries."""
  _check_n_m(n, m)
  shape = tuple(shape)
  axis = _check_leaf((), shape, m, axis, root="the dense matrix")
  moved = tuple(np.moveaxis(np.empty(shape, np.int8), axis, -1).shape)
  groups = moved[:-1] + (moved[-1] // m,)
  expected = groups[:-1] + (groups[-1] * n,)
  if c.values.shape != expected or c.indices.shape != expected:
    raise ValueError(f"compressed values and indices of shapes {c.values.shape} and "
                     f"{c.indices.shape} do not hold a {n}:{m} matrix of shape {shape} along "
                     f"axis {axis}: expected {expected} for both")
  values = c.values.reshape(groups + (n,))
  indices = c.indices.astype(jnp.int32).reshape(groups + (n,))
  one_hot = jax.nn.one_hot(indices, m, dtype=c.values.dtype)  # (..., n, m)
  dense = jnp.einsum("...nm,...n->...m", one_hot, values)
  return jnp.moveaxis(dense.reshape(moved), -1, axis)


def n_m_matmul(x: jax.Array, c: NMCompressed, n: int, m: int) -> jax.Array:
  """``x @ W`` for ``W`` of shape ``(K, N)`` compressed N:M along K (``axis=0``).

  A jnp reference: gathers the `n` inputs each kept weight multiplies, never
  forming the dense ``W``.

  Args:
    x: [..., K]
    c: `compress_n_m(W, n, m, axis=0)`; values and indices of shape
      ``(N, K // m * n)``.
    n, m: the pattern.

  Returns:
    [..., N]
  """
  _check_n_m(n, m)
  if c.values.ndim != 2 or c.indices.shape != c.values.shape:
    raise ValueError(f"c must be compress_n_m(W, n, m, axis=0) of a 2-d W: values and indices "
                     f"of one shape (N, K // m * n), got {c.values.shape} and {c.indices.shape}")
  out_dim, kept = c.values.shape
  if n == 0:
    raise ValueError("n=0 keeps no weights: n_m_matmul needs n >= 1")
  if kept % n:
    raise ValueError(f"c holds {kept} kept weights per output, not a multiple of n={n}")
  k = kept // n * m
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features, the compressed weight expects {k}")
  group = jnp.arange(kept) // n * m  # first input of each kept weight's group
  rows = group[None, :] + c.indices.astype(jnp.int32)  # (N, kept) input index per weight
  gathered = jnp.take(x, rows, axis=-1)  # [..., N, kept]
  return jnp.einsum("...ok,ok->...o", gathered, c.values.astype(x.dtype))
