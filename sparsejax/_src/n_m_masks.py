"""N:M mask algorithms: N kept entries in every group of M consecutive ones along an axis.

Groups run along `axis`, by default -2: for a Dense kernel ``(in, out)`` the
inputs of each output, the layout that sparse tensor cores accelerate. The
same default holds in `n_m`, `compress_n_m` and `n_m_matmul`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import topk

DEFAULT_AXIS = -2
MAX_TRANSPOSABLE_M = 5


def group_axis(shape: tuple[int, ...], m: int, axis: int, what: str) -> int:
  """`axis` normalized, after checking that `m` divides it."""
  axis = _checks.axis(axis, shape, what)
  if shape[axis] % m:
    raise ValueError(f"m={m} does not divide axis {axis} (length {shape[axis]}) of {what} of "
                     f"shape {tuple(shape)}")
  return axis


def check_transposable(n, m: int) -> None:
  if callable(n) or not _checks.is_concrete(n):
    raise ValueError("transposable masks need a fixed integer n, not a schedule or a traced value")
  if m > MAX_TRANSPOSABLE_M:
    raise ValueError(f"transposable {n}:{m} masks are searched exactly over all patterns, which "
                     f"supports m <= {MAX_TRANSPOSABLE_M}; got m={m}")


def n_m_mask(scores: jax.Array, n: jax.Array | int, m: int, *,
             axis: int = DEFAULT_AXIS) -> jax.Array:
  """Exact N:M mask: the `n` largest scores of every `m` consecutive entries along `axis`.

  Ties go to the lower index, NaN ranks lowest (as in `topk_mask`). `n` may be
  traced, so an N:M ramp (4:4 -> 2:4 -> 1:4) needs no recompilation.

  Example:
    >>> mask = sj.n_m_mask(jnp.abs(w), 2, 4)   # 2:4 along the input dim of an (in, out) kernel
  """
  _checks.n_m(n, m)
  scores = jnp.asarray(scores)
  axis = group_axis(scores.shape, m, axis, "scores")
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
  check_transposable(n, m)
  _checks.n_m(n, m)
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
