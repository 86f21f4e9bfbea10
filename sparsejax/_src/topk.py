"""Exact top-k masks without sorting large arrays.

`topk_mask(scores, k)` returns a boolean mask with exactly ``k`` True entries:
the ``k`` largest scores, ties broken by lower flat index, NaN ranked below
``-inf``, subnormal scores counted as zero. That is the result of a stable
descending argsort, which is what small leaves use. Large leaves never sort:
a search over the order-preserving uint32 keys of the scores (thresholds are
keys, compared against the float scores, so no key array is materialized)
finds a threshold with

1. a bracket from a sorted pseudo-random sample of 4096 keys (2 counting passes),
2. interpolation on the count of keys above a threshold, falling back to a
   bisection step whenever an interpolation step fails to shrink the bracket
   by 4x (one counting pass each: a handful for weight-like scores, at most
   about 64 for adversarial ones),
3. for ties at the threshold only, one more pass that counts ties per row,
   to take the first tied entries in flat order.

A pass reads the leaf once and keeps one byte per entry at most (XLA on CPU
does not fuse a reduction into its producer, so counts go row by row in
uint8), which keeps a mask update's memory small next to a train step's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Leaves up to this size are ranked with a stable argsort.
SORT_MAX_SIZE = 1 << 16
_SAMPLE_SIZE = 1 << 12
_MAX_SIZE = (1 << 31) - 1
_UINT_MAX = 0xFFFFFFFF


def _sanitize(scores: jax.Array) -> jax.Array:
  """Flat float32 scores with NaN as -inf and -0.0 and subnormals as 0.0.

  Subnormals are flushed explicitly because XLA's CPU comparisons flush them,
  and both paths (sort and search) must rank alike.
  """
  s = scores.reshape(-1).astype(jnp.float32)
  tiny = (lax.bitcast_convert_type(s, jnp.uint32) & jnp.uint32(0x7F800000)) == 0
  return jnp.where(jnp.isnan(s), -jnp.inf, jnp.where(tiny, 0.0, s))


def keys(scores: jax.Array) -> jax.Array:
  """Flat uint32 keys in the order of the float32 scores; NaN is lowest."""
  bits = lax.bitcast_convert_type(_sanitize(scores), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _key_value(t: jax.Array) -> jax.Array:
  """The smallest float32 whose key is >= t.

  ``s >= _key_value(t)`` on sanitized scores equals ``keys(s) >= t``.
  """
  positive = t >= jnp.uint32(0x80000000)
  bits = jnp.where(positive, t & jnp.uint32(0x7FFFFFFF), ~t)
  value = lax.bitcast_convert_type(bits, jnp.float32)
  # Keys below that of -inf (unused, NaN bit patterns) count everything.
  return jnp.where(~positive & (t <= jnp.uint32(0x007FFFFF)), -jnp.inf, value)


def _row_length(n: int) -> int:
  """The largest divisor of n up to 255: rows whose counts fit in uint8."""
  return next(d for d in range(min(n, 255), 0, -1) if n % d == 0)


def _row_counts(flags: jax.Array) -> jax.Array:
  """True entries per row of `flags` (flat bool) cut into rows of `_row_length`.

  Counting row by row in uint8 keeps what XLA materializes to one byte per
  entry (a plain int32 sum materializes four on CPU).
  """
  n = flags.size
  return jnp.sum(flags.reshape(n // _row_length(n), -1), axis=1, dtype=jnp.uint8)


def _count_ge(s: jax.Array, t: jax.Array) -> jax.Array:
  return jnp.sum(_row_counts(s >= _key_value(t)), dtype=jnp.int32)


def _search(count: Callable[[jax.Array], jax.Array], lo, hi, c_lo, c_hi, k):
  """Narrows ``lo < hi`` (uint32) with ``count(lo) = c_lo >= k > c_hi = count(hi)``.

  `count` must not increase with its argument. Stops when ``count(lo) == k``
  or ``hi == lo + 1``; returns ``(lo, hi, count(lo), count(hi))``.
  """

  def cond(carry):
    lo, hi, c_lo, _, _ = carry
    return (hi - lo > 1) & (c_lo != k)

  def body(carry):
    lo, hi, c_lo, c_hi, bisect = carry
    width = hi - lo
    frac = (c_lo - k).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
    frac = jnp.clip(frac, 0.0, 1.0)
    guess = jnp.minimum(frac * width.astype(jnp.float32), 4.0e9).astype(jnp.uint32)
    step = jnp.where(bisect, width >> 1, guess)
    t = lo + jnp.clip(step, jnp.uint32(1), width - 1)
    c_t = count(t)
    above = c_t >= k
    new_lo, new_c_lo = jnp.where(above, t, lo), jnp.where(above, c_t, c_lo)
    new_hi, new_c_hi = jnp.where(above, hi, t), jnp.where(above, c_hi, c_t)
    # Interpolation that keeps a quarter of the bracket's entries or more is
    # followed by one bisection step, so the search never stalls.
    slow = (new_c_lo - new_c_hi).astype(jnp.float32) * 4 >= (c_lo - c_hi).astype(jnp.float32)
    return new_lo, new_hi, new_c_lo, new_c_hi, ~bisect & slow

  lo, hi, c_lo, c_hi, _ = lax.while_loop(
      cond, body, (lo, hi, c_lo, c_hi, jnp.bool_(False)))
  return lo, hi, c_lo, c_hi


def _sample_bracket(ss: Sequence[jax.Array], k: jax.Array):
  """Keys ``lo < hi`` likely to bracket the k-th largest key over scores `ss`."""
  total = sum(s.size for s in ss)
  samples, weights = [], []
  for s in ss:
    m = int(min(s.size, max(1, round(_SAMPLE_SIZE * s.size / total))))
    # A multiplicative hash spreads the sample over the whole leaf.
    idx = (np.arange(m, dtype=np.uint64) * 2654435761) % s.size
    samples.append(keys(s[jnp.asarray(idx.astype(np.int32))]))
    weights.append(np.full(m, s.size / m, np.float32))
  # Sorting ~keys ascending sorts keys descending, weights alongside.
  flipped, weight = lax.sort((~jnp.concatenate(samples), jnp.asarray(np.concatenate(weights))),
                             num_keys=1)
  sample = ~flipped
  m = sample.size
  i = jnp.searchsorted(jnp.cumsum(weight), k.astype(jnp.float32)).astype(jnp.float32)
  margin = 3.0 * jnp.sqrt(i * (1.0 - i / m)) + 2.0
  i_lo = jnp.clip(i + margin, 0, m - 1).astype(jnp.int32)
  i_hi = jnp.clip(i - margin, 0, m - 1).astype(jnp.int32)
  return sample[i_lo], sample[i_hi] + 1


def _threshold(count, ss, k, c_bottom, c_top):
  """Search for the k-th largest key; returns (lo, hi, count(lo), count(hi)).

  `c_bottom` and `c_top` are the counts at keys 0 and 2**32 - 1.
  """
  lo, hi = _sample_bracket(ss, k)
  c_lo, c_hi = count(lo), count(hi)
  lo_ok, hi_ok = c_lo >= k, c_hi < k
  # A sample can miss; the counts just taken still bound the answer.
  zero, top = jnp.uint32(0), jnp.uint32(_UINT_MAX)
  new_lo = jnp.where(lo_ok, lo, jnp.where(hi_ok, zero, hi))
  new_c_lo = jnp.where(lo_ok, c_lo, jnp.where(hi_ok, c_bottom, c_hi))
  new_hi = jnp.where(hi_ok, hi, jnp.where(lo_ok, top, lo))
  new_c_hi = jnp.where(hi_ok, c_hi, jnp.where(lo_ok, c_top, c_lo))
  return _search(count, new_lo, new_hi, new_c_lo, new_c_hi, k)


def _sorted_topk(u: jax.Array, k: jax.Array) -> jax.Array:
  order = jnp.argsort(~u, stable=True)
  rank = jnp.zeros(u.shape, jnp.int32).at[order].set(jnp.arange(u.size, dtype=jnp.int32))
  return rank < k


def _cut(s: jax.Array, lo: jax.Array, hi: jax.Array, c_lo: jax.Array, c_hi: jax.Array,
         k: jax.Array) -> jax.Array:
  """The k-entry mask of a finished search: all keys >= hi, then ties at lo.

  Needs ``c_lo = #(keys >= lo)``, ``c_hi = #(keys >= hi)`` and either
  ``k == c_lo`` or ``hi == lo + 1`` with ``c_hi <= k < c_lo``.
  """
  n = s.size
  tied = c_lo != k
  at_lo = s == _key_value(lo)

  def first_ties():
    # Keep the first r = k - c_hi entries tied at lo, in flat order: find
    # the row holding the r-th tie from cumulative row counts, then the
    # column within that row.
    r = k - c_hi
    rows = jnp.cumsum(_row_counts(at_lo), dtype=jnp.int32)
    row = jnp.searchsorted(rows, r)  # first row whose cumulative count reaches r
    width = _row_length(n)
    in_row = lax.dynamic_slice(at_lo, (row * width,), (width,))
    need = r - jnp.where(row > 0, rows[jnp.maximum(row - 1, 0)], 0)
    col = jnp.searchsorted(jnp.cumsum(in_row, dtype=jnp.int32), need)
    return (row * width + col + 1).astype(jnp.int32)

  bound = lax.cond(tied & (k > c_hi), first_ties, lambda: jnp.int32(0))
  cut = jnp.where(tied, hi, lo)
  index = jnp.arange(n, dtype=jnp.int32)
  return (s >= _key_value(cut)) | (at_lo & (index < bound))


def _searched_topk(s: jax.Array, k: jax.Array) -> jax.Array:
  count = lambda t: _count_ge(s, t)
  lo, hi, c_lo, c_hi = _threshold(count, [s], k, jnp.int32(s.size), jnp.int32(0))
  return _cut(s, lo, hi, c_lo, c_hi, k)


METHODS = ("sort", "search")


def topk_mask(scores: jax.Array, k: jax.Array | int, *, method: str | None = None) -> jax.Array:
  """Mask of the `k` largest `scores`, exactly `k` True entries.

  Ties go to the lower flat index, NaN ranks below ``-inf`` and subnormal
  scores count as zero, so the result equals taking the first `k` of a stable
  descending argsort of the scores so cleaned. `k` may
  be traced; it is clipped to ``[0, scores.size]``.

  Args:
    scores: float array of any shape (computed in float32).
    k: number of entries to keep.
    method: "sort" (a stable argsort: the reference), "search" (a threshold
      search by counting passes, no sort: fast on large arrays) or None
      (the default: sort up to 65,536 entries, search above). Both give the
      same mask.

  Returns:
    bool array of the shape of `scores`.

  Example:
    >>> sj.topk_mask(jnp.array([0.3, -1.0, 2.0, 0.3]), 2)
    Array([ True, False,  True, False], dtype=bool)
  """
  scores = jnp.asarray(scores)
  if jnp.issubdtype(scores.dtype, jnp.complexfloating):
    raise ValueError(f"scores must be real, got {scores.dtype}")
  if isinstance(k, (str, bytes)) or jnp.ndim(k) != 0:
    raise ValueError(f"k={k!r} must be an integer scalar")
  if (not jnp.issubdtype(jnp.result_type(k), jnp.integer) and not isinstance(k, jax.core.Tracer)
      and not float(k).is_integer()):
    raise ValueError(f"k={k!r} must be an integer")
  if method is not None and method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {METHODS} or None")
  n = scores.size
  if n > _MAX_SIZE:
    raise ValueError(f"topk_mask supports up to {_MAX_SIZE} entries, got {n}")
  if n == 0:
    return jnp.zeros(scores.shape, jnp.bool_)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, n)
  if method == "sort" or (method is None and n <= SORT_MAX_SIZE):
    mask = _sorted_topk(keys(scores), k)
  else:
    mask = _searched_topk(_sanitize(scores), jnp.maximum(k, 1)) & (k > 0)
  return mask.reshape(scores.shape)


def _global_search(scores, total, floors):
  ss = [_sanitize(s) for s in scores]
  floors = jnp.stack([jnp.asarray(f, jnp.int32) for f in floors])
  total = jnp.asarray(total, jnp.int32)
  n_all = sum(s.size for s in ss)
  if n_all > _MAX_SIZE:
    raise ValueError(f"a global top-k supports up to {_MAX_SIZE} entries in all, got {n_all}")
  # Floors that overshoot the total (by float rounding) give back the excess,
  # last leaves first, so the total stays exact.
  excess = jnp.maximum(jnp.sum(floors) - total, 0)
  after = jnp.cumsum(floors[::-1])[::-1] - floors
  floors = floors - jnp.clip(excess - after, 0, floors)

  def per_leaf(t):
    return jnp.stack([_count_ge(s, t) for s in ss])

  count = lambda t: jnp.sum(jnp.maximum(per_leaf(t), floors))
  floor_sum = jnp.sum(floors)
  lo, hi, c_lo, c_hi = _threshold(
      count, ss, jnp.maximum(total, 1), jnp.int32(n_all), floor_sum)
  raw_lo, raw_hi = per_leaf(lo), per_leaf(hi)
  at_lo, above = jnp.maximum(raw_lo, floors), jnp.maximum(raw_hi, floors)
  # Exact hit: counts at lo. Ties at lo: counts above it plus the tied
  # entries leaf by leaf until the total is reached.
  extra = at_lo - above
  before = jnp.cumsum(extra) - extra
  share = jnp.clip(total - c_hi - before, 0, extra)
  counts = jnp.where(c_lo == total, at_lo, above + share)
  # If the floors alone reach the total, no threshold is needed.
  counts = jnp.where(floor_sum >= total, floors, counts)
  return ss, counts, (lo, hi, raw_lo, raw_hi)


def global_counts(scores: Sequence[jax.Array], total: jax.Array,
                  floors: Sequence[jax.Array]) -> list[jax.Array]:
  """Per-leaf counts for one threshold across leaves, with per-leaf floors.

  Leaf ``l`` keeps ``max(#(scores_l >= t), floors[l])`` entries for the
  threshold ``t`` at which the counts add up to `total`; entries tied at the
  threshold go to earlier leaves first. Floors that add up to more than
  `total` are lowered, last leaves first.

  Returns:
    a list of int32 counts, one per leaf, that sum to `total`.
  """
  _, counts, _ = _global_search(scores, total, floors)
  return list(counts)


def global_masks(scores: Sequence[jax.Array], total: jax.Array,
                 floors: Sequence[jax.Array]) -> list[jax.Array]:
  """The masks of `global_counts`: the same counts, the top-scoring entries of each leaf.

  Leaves whose count the shared threshold decides are cut at it directly (one
  pass each); only leaves held up by their floor run a search of their own.
  """
  ss, counts, (lo, hi, raw_lo, raw_hi) = _global_search(scores, total, floors)
  masks = []
  for s, score, k, c_lo, c_hi in zip(ss, scores, counts, raw_lo, raw_hi):
    at_threshold = (k == c_lo) | ((hi == lo + 1) & (c_hi <= k) & (k < c_lo))
    mask = lax.cond(at_threshold,
                    lambda s=s, k=k, c_lo=c_lo, c_hi=c_hi: _cut(s, lo, hi, c_lo, c_hi, k),
                    lambda score=score, k=k: topk_mask(score, k).reshape(-1))
    masks.append(mask.reshape(score.shape))
  return masks
