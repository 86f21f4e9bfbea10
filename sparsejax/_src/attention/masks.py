"""Attention masks: which (query, key) positions may attend.

A mask is a small immutable, hashable description. It evaluates with NumPy on
the host (``mask[q_slice, kv_slice]``, to build layouts) and, through the
same code, with jnp on traced indices (``mask(q_ids, kv_ids)``), so partial
blocks can be recomputed inside kernels. Masks compose with ``&`` and ``|``;
``bool(mask)`` raises, to catch ``and``/``or`` used by mistake.

`Mask.block_any_all` classifies the blocks of a grid as empty, partial or
full. The structured masks do it in closed form, in O(blocks): the interval
masks (full, causal, local, chunked and their ``&``) from each row's key
interval ``[lo(i), hi(i)]``, the others from column, diagonal or pattern-block
counts; a combination takes its children's tables and evaluates elementwise
only the blocks they leave undecided (two partial children). `NumpyMask` and
other masks evaluate every element.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks


def _xp(*arrays):
  """NumPy for NumPy inputs, jax.numpy for anything traced or on device."""
  if any(isinstance(a, (jax.Array, jax.core.Tracer)) for a in arrays):
    return jnp
  return np


def _floordiv(a, n: int, xp):
  """``a // n`` for an int ``n >= 1``, traced without the sign op of jnp's floor division.

  (Mosaic lowers that op only when it can query a TPU, so a kernel with it
  does not export for TPU from another machine.)
  """
  if xp is np:
    return a // n
  from jax import lax  # pylint: disable=g-import-not-at-top
  return lax.div(a - xp.where(a < 0, n - 1, 0).astype(a.dtype), xp.asarray(n, a.dtype))


def _check_ints(owner, **values):
  """Raises ValueError unless each value is an integer >= its minimum (None: any integer)."""
  for name, (value, minimum) in values.items():
    _checks.static_int(f"{owner}: {name}", value, minimum=minimum)


def _check_shape(shape):
  if (not isinstance(shape, tuple) or len(shape) != 2
      or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape)):
    raise ValueError(f"shape={shape!r} must be (q_len, kv_len) with positive ints")


_EVAL_ELEMENTS = 1 << 20  # entries evaluated at once by the element paths


def iter_block_elements(evaluate, q_blocks: np.ndarray, kv_blocks: np.ndarray,
                        block_q: int, block_kv: int):
  """Yields (slice, bool[n, block_q, block_kv]): the entries of blocks (q_blocks, kv_blocks).

  `evaluate(q_ids, kv_ids)` broadcasts, as `Mask.__call__` does; the blocks
  are evaluated together, a few million entries at a time.
  """
  step = max(1, _EVAL_ELEMENTS // (block_q * block_kv))
  index = np.int32  # as inside the kernels; the arithmetic on indices is most of the time
  rows = np.arange(block_q, dtype=index)[None, :, None]
  cols = np.arange(block_kv, dtype=index)[None, None, :]
  for start in range(0, len(q_blocks), step):
    s = slice(start, start + step)
    q = q_blocks[s, None, None].astype(index) * block_q + rows
    kv = kv_blocks[s, None, None].astype(index) * block_kv + cols
    yield s, np.broadcast_to(evaluate(q, kv), (len(q), block_q, block_kv))


def _evaluate_blocks(evaluate, where: np.ndarray, block_q: int, block_kv: int):
  """(any, all) of each block where `where` is set, by element evaluation."""
  q_blocks, kv_blocks = np.nonzero(where)
  any_, all_ = np.empty(len(q_blocks), bool), np.empty(len(q_blocks), bool)
  for s, entries in iter_block_elements(evaluate, q_blocks, kv_blocks, block_q, block_kv):
    any_[s], all_[s] = entries.any(axis=(1, 2)), entries.all(axis=(1, 2))
  return any_, all_


def _and_tables(a, b, evaluate, block_q, block_kv):
  """(any, all) of ``A & B`` from those of A and B; blocks where both are partial are evaluated."""
  any_, all_ = a[0] & b[0], a[1] & b[1]
  undecided = any_ & ~a[1] & ~b[1]
  if undecided.any():
    any_[undecided] = _evaluate_blocks(evaluate, undecided, block_q, block_kv)[0]
  return any_, all_


def _or_tables(a, b, evaluate, block_q, block_kv):
  """(any, all) of ``A | B`` from those of A and B; blocks where both are partial are evaluated."""
  any_, all_ = a[0] | b[0], a[1] | b[1]
  undecided = a[0] & b[0] & ~all_
  if undecided.any():
    all_[undecided] = _evaluate_blocks(evaluate, undecided, block_q, block_kv)[1]
  return any_, all_


def _interval_tables(lo: np.ndarray, hi: np.ndarray, kv_len: int, block_q: int, block_kv: int):
  """(any, all) of the mask whose row ``i`` sees keys ``lo[i] <= j <= hi[i]``.

  Exact when `lo` and `hi` do not decrease with ``i``: a block is full when
  its last row starts and its first row ends outside it, and has a visible
  entry when some non-empty row in it starts by its last key and ends at or
  after its first key (rows a prefix and a suffix of the block select).
  """
  lo, hi = np.maximum(lo, 0), np.minimum(hi, kv_len - 1)
  r0 = np.arange(len(lo) // block_q) * block_q
  k0 = np.arange(kv_len // block_kv) * block_kv
  k1 = k0 + block_kv - 1
  all_ = (lo[r0 + block_q - 1][:, None] <= k0) & (hi[r0][:, None] >= k1)
  first = np.maximum(r0[:, None], np.searchsorted(hi, k0, side="left"))  # rows reaching k0
  stop = np.minimum(r0[:, None] + block_q, np.searchsorted(lo, k1, side="right"))  # starting by k1
  nonempty = np.concatenate([[0], np.cumsum(lo <= hi)])
  any_ = nonempty[np.maximum(stop, first)] > nonempty[first]
  return any_, all_


def _column_tables(columns: np.ndarray, num_q_blocks: int, block_kv: int):
  """(any, all) of the mask where key ``j`` is visible from every query iff ``columns[j]``."""
  count = columns.reshape(-1, block_kv).sum(axis=1)
  return (np.repeat((count > 0)[None], num_q_blocks, axis=0),
          np.repeat((count == block_kv)[None], num_q_blocks, axis=0))


def _element_tables(mask, block_q, block_kv):
  """(any, all) by evaluating every entry, a row of blocks at a time."""
  q_len, kv_len = mask.shape
  nq, nk = q_len // block_q, kv_len // block_kv
  any_, all_ = np.empty((nq, nk), bool), np.empty((nq, nk), bool)
  for i in range(nq):
    rows = mask[i * block_q:(i + 1) * block_q, :].reshape(block_q, nk, block_kv)
    any_[i], all_[i] = rows.any(axis=(0, 2)), rows.all(axis=(0, 2))
  return any_, all_


class Mask:
  """Base class: a boolean (q_len, kv_len) pattern.

  A subclass defines ``_eval(q, kv, xp)``; it may also define
  ``_any_all(block_q, block_kv)`` (exact block tables) and set
  ``_closed_form = True`` when that costs O(blocks), so `make_layout` never
  evaluates its elements outside the partial blocks.
  """

  shape: tuple[int, int]
  _closed_form = False  # whether _any_all is O(blocks), not element evaluation

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "_eval" in vars(cls) and not {"_any_all", "_intervals"} & vars(cls).keys():
      # A new element rule voids the block tables a subclass would inherit.
      cls._closed_form, cls._intervals, cls._any_all = False, Mask._intervals, Mask._any_all
    if "_eval" in vars(cls) and "_needed" not in vars(cls):
      cls._needed = Mask._needed  # and the keys it keeps for decoding

  def _eval(self, q, kv, xp):
    raise NotImplementedError

  def _intervals(self):
    """(lo, hi) int64[q_len]: row i sees exactly keys lo[i]..hi[i], both non-decreasing; or None."""
    return None

  def _needed(self, position, kv, xp):
    """Whether some query at `position` or later may read key `kv` (a superset is safe)."""
    return xp.ones(xp.broadcast_shapes(xp.shape(position), xp.shape(kv)), bool)

  def _any_all(self, block_q, block_kv):
    intervals = self._intervals()
    if intervals is not None:
      return _interval_tables(*intervals, self.shape[1], block_q, block_kv)
    return _element_tables(self, block_q, block_kv)

  def block_any_all(self, block_q: int, block_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """Which blocks of a (block_q, block_kv) grid have some, and which have every, entry visible.

    Closed form, O(blocks), for the structured masks and their ``&`` and
    ``|``; element evaluation for `NumpyMask` and masks without a closed form.

    Args:
      block_q, block_kv: block sizes; they must divide the mask's shape.

    Returns:
      (any bool[q_blocks, kv_blocks], all bool[q_blocks, kv_blocks]): a
      block is empty where ``~any``, full where ``all``, partial otherwise.

    Example:
      >>> mask = sja.CausalMask((T, T)) & sja.LocalMask((T, T), window=(1024, 0))
      >>> any_, all_ = mask.block_any_all(128, 128)
      >>> partial = any_ & ~all_                     # the blocks on the window's edges
    """
    for name, value, length in [("block_q", block_q, self.shape[0]),
                                ("block_kv", block_kv, self.shape[1])]:
      _checks.static_int(name, value, minimum=1)
      if length % value:
        raise ValueError(f"{name}={value} must divide the mask's length {length}")
    any_, all_ = self._any_all(int(block_q), int(block_kv))
    return np.asarray(any_, bool), np.asarray(all_, bool)

  def __call__(self, q_ids, kv_ids):
    """Whether each (q_ids, kv_ids) pair may attend; broadcasts; NumPy or traced."""
    xp = _xp(q_ids, kv_ids)
    return xp.broadcast_to(self._eval(q_ids, kv_ids, xp),
                           xp.broadcast_shapes(xp.shape(q_ids), xp.shape(kv_ids)))

  def __getitem__(self, idx) -> np.ndarray:
    """NumPy evaluation on a (q_slice, kv_slice) window."""
    if not (isinstance(idx, tuple) and len(idx) == 2 and all(isinstance(i, slice) for i in idx)):
      raise ValueError(f"index masks with two slices, mask[q0:q1, k0:k1], got {idx!r}")
    q = np.arange(self.shape[0])[idx[0]]
    kv = np.arange(self.shape[1])[idx[1]]
    return self(q[:, None], kv[None, :])

  def to_numpy(self) -> np.ndarray:
    return self[:, :]

  def __bool__(self):
    raise ValueError("a mask has no truth value: combine masks with & and |, not and/or")

  def _check_other(self, other):
    if not isinstance(other, Mask):
      raise ValueError(f"can only combine masks with masks, got {type(other).__name__}")
    if other.shape != self.shape:
      raise ValueError(f"mask shapes differ: {self.shape} and {other.shape}")

  def __and__(self, other):
    self._check_other(other)
    return LogicalAnd(self, other)

  def __or__(self, other):
    self._check_other(other)
    return LogicalOr(self, other)


@dataclasses.dataclass(frozen=True)
class LogicalAnd(Mask):
  left: Mask
  right: Mask

  @property
  def shape(self):
    return self.left.shape

  @property
  def _closed_form(self):
    return self.left._closed_form and self.right._closed_form  # pylint: disable=protected-access

  def _eval(self, q, kv, xp):
    return self.left._eval(q, kv, xp) & self.right._eval(q, kv, xp)  # pylint: disable=protected-access

  def _needed(self, position, kv, xp):
    left, right = self.left._needed, self.right._needed  # pylint: disable=protected-access
    return left(position, kv, xp) & right(position, kv, xp)

  def _intervals(self):
    a, b = self.left._intervals(), self.right._intervals()  # pylint: disable=protected-access
    if a is None or b is None:
      return None
    return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])

  def _any_all(self, block_q, block_kv):
    if self._intervals() is not None:  # an intersection of intervals is one
      return super()._any_all(block_q, block_kv)
    return _and_tables(self.left._any_all(block_q, block_kv),  # pylint: disable=protected-access
                       self.right._any_all(block_q, block_kv),  # pylint: disable=protected-access
                       self, block_q, block_kv)


@dataclasses.dataclass(frozen=True)
class LogicalOr(Mask):
  left: Mask
  right: Mask

  @property
  def shape(self):
    return self.left.shape

  @property
  def _closed_form(self):
    return self.left._closed_form and self.right._closed_form  # pylint: disable=protected-access

  def _eval(self, q, kv, xp):
    return self.left._eval(q, kv, xp) | self.right._eval(q, kv, xp)  # pylint: disable=protected-access

  def _needed(self, position, kv, xp):
    left, right = self.left._needed, self.right._needed  # pylint: disable=protected-access
    return left(position, kv, xp) | right(position, kv, xp)

  def _any_all(self, block_q, block_kv):
    return _or_tables(self.left._any_all(block_q, block_kv),  # pylint: disable=protected-access
                      self.right._any_all(block_q, block_kv),  # pylint: disable=protected-access
                      self, block_q, block_kv)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every query attends to every key."""

  shape: tuple[int, int]

  def __post_init__(self):
    _check_shape(self.shape)

  _closed_form = True

  def _eval(self, q, kv, xp):
    return xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)

  def _intervals(self):
    return np.zeros(self.shape[0], np.int64), np.full(self.shape[0], self.shape[1] - 1, np.int64)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """Query ``i`` attends to keys ``j <= i + offset``."""

  shape: tuple[int, int]
  offset: int = 0

  def __post_init__(self):
    _check_shape(self.shape)
    _check_ints("CausalMask", offset=(self.offset, None))

  _closed_form = True

  def _eval(self, q, kv, xp):
    return kv <= q + self.offset

  def _intervals(self):
    i = np.arange(self.shape[0], dtype=np.int64)
    return np.zeros_like(i), i + self.offset


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Query ``i`` attends to keys in ``[i - left, i + right]`` (None: unbounded)."""

  shape: tuple[int, int]
  window: tuple[int | None, int | None]
  offset: int = 0

  def __post_init__(self):
    _check_shape(self.shape)
    if (not isinstance(self.window, tuple) or len(self.window) != 2
        or not all(w is None or (isinstance(w, (int, np.integer)) and w >= 0)
                   for w in self.window)):
      raise ValueError(f"window={self.window!r} must be (left, right) of ints >= 0 or None")
    _check_ints("LocalMask", offset=(self.offset, None))

  _closed_form = True

  def _intervals(self):
    left, right = self.window
    i = np.arange(self.shape[0], dtype=np.int64) + self.offset
    return (np.zeros_like(i) if left is None else i - left,
            np.full_like(i, self.shape[1] - 1) if right is None else i + right)

  def _eval(self, q, kv, xp):
    left, right = self.window
    out = xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)
    if left is not None:
      out = out & (kv >= q + self.offset - left)
    if right is not None:
      out = out & (kv <= q + self.offset + right)
    return out

  def _needed(self, position, kv, xp):
    left = self.window[0]
    return super()._needed(position, kv, xp) if left is None else kv >= position + self.offset - left


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
  """Causal attention inside consecutive chunks of `chunk` positions."""

  shape: tuple[int, int]
  chunk: int

  def __post_init__(self):
    _check_shape(self.shape)
    if not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
      raise ValueError(f"chunk={self.chunk!r} must be an int >= 1")

  _closed_form = True

  def _eval(self, q, kv, xp):
    return (_floordiv(q, self.chunk, xp) == _floordiv(kv, self.chunk, xp)) & (kv <= q)

  def _intervals(self):
    i = np.arange(self.shape[0], dtype=np.int64)
    return i - i % self.chunk, i

  def _needed(self, position, kv, xp):
    return kv >= self.chunk * _floordiv(position, self.chunk, xp)


@dataclasses.dataclass(frozen=True)
class AShapeMask(Mask):
  """Causal attention to the first `sink` keys and the last `window` (Λ-shape)."""

  shape: tuple[int, int]
  sink: int
  window: int

  def __post_init__(self):
    _check_shape(self.shape)
    _check_ints("AShapeMask", sink=(self.sink, None), window=(self.window, None))
    if self.sink < 0 or self.window < 1:
      raise ValueError(f"sink={self.sink} must be >= 0 and window={self.window} >= 1")

  _closed_form = True

  def _eval(self, q, kv, xp):
    return (kv <= q) & ((kv < self.sink) | (q - kv < self.window))

  def _needed(self, position, kv, xp):
    return (kv < self.sink) | (kv > position - self.window)

  def _any_all(self, block_q, block_kv):
    i = np.arange(self.shape[0], dtype=np.int64)
    sink = _interval_tables(np.zeros_like(i), np.minimum(i, self.sink - 1), self.shape[1],
                            block_q, block_kv)
    recent = _interval_tables(i - self.window + 1, i, self.shape[1], block_q, block_kv)
    return _or_tables(sink, recent, self, block_q, block_kv)


@dataclasses.dataclass(frozen=True)
class StridedShardMask(Mask):
  """One head of S2-Attention: a local window plus every `num_shards`-th key block.

  The head attends (causally) to the keys within `local_window` of the query
  and to key blocks ``b`` with ``b % num_shards == shard``. `for_heads` gives
  heads offset shards, so their union covers the whole causal context.

  Reference: S2-Attention: Hardware-Aware Context Sharding Among Attention
  Heads. Lin, Tang, Zhang, Wang, Choi, Lin, Peng, 2024. arXiv:2407.17678.
  """

  shape: tuple[int, int]
  block: int
  num_shards: int
  shard: int
  local_window: int = 0
  causal: bool = True

  def __post_init__(self):
    _check_shape(self.shape)
    _check_ints("StridedShardMask", block=(self.block, None), num_shards=(self.num_shards, None),
                shard=(self.shard, None), local_window=(self.local_window, 0))
    if self.block < 1 or self.num_shards < 1 or not 0 <= self.shard < self.num_shards:
      raise ValueError(f"need block >= 1, num_shards >= 1 and 0 <= shard < num_shards, got "
                       f"block={self.block}, num_shards={self.num_shards}, shard={self.shard}")

  _closed_form = True

  def _in_shard(self, kv, xp=np):
    blocks = _floordiv(kv, self.block, xp)
    return blocks - self.num_shards * _floordiv(blocks, self.num_shards, xp) == self.shard

  def _eval(self, q, kv, xp):
    out = self._in_shard(kv, xp) | ((q - kv < self.local_window) & (kv - q < self.local_window))
    return out & (kv <= q) if self.causal else out

  def _needed(self, position, kv, xp):
    return self._in_shard(kv, xp) | (kv > position - self.local_window)

  def _any_all(self, block_q, block_kv):
    (q_len, kv_len), window = self.shape, self.local_window
    i = np.arange(q_len, dtype=np.int64)
    shard = _column_tables(self._in_shard(np.arange(kv_len)), q_len // block_q, block_kv)
    near_hi = np.minimum(i + window - 1, i) if self.causal else i + window - 1
    near = _interval_tables(i - window + 1, near_hi, kv_len, block_q, block_kv)
    if self.causal:
      shard = _and_tables(shard, CausalMask(self.shape)._any_all(block_q, block_kv),
                          lambda q, kv: self._in_shard(kv) & (kv <= q), block_q, block_kv)
    return _or_tables(shard, near, self, block_q, block_kv)

  @classmethod
  def for_heads(cls, shape, num_heads, *, block, num_shards, local_window=0, causal=True):
    """A `MultiHeadMask` whose head ``h`` reads shard ``h % num_shards``."""
    return MultiHeadMask(tuple(
        cls(shape, block, num_shards, h % num_shards, local_window, causal)
        for h in range(num_heads)))


def _hash_array(a: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).tobytes()
                      + str(a.shape).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class _TableMask(Mask):
  """Masks backed by small NumPy tables; hashed by content."""

  def _key(self):
    raise NotImplementedError

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True, eq=False)
class BigBirdMask(_TableMask):
  """BigBird: global blocks, a sliding window of blocks and random blocks per row.

  Reference: Big Bird: Transformers for Longer Sequences. Zaheer et al., 2020.
  arXiv:2007.14062.

  Attributes:
    block: block size of the pattern.
    num_global: leading key and query blocks that attend everywhere.
    window: blocks on each side of the diagonal.
    num_random: random key blocks per query block, drawn with `seed`.
    causal: also require key <= query.
  """

  shape: tuple[int, int]
  block: int
  num_global: int = 1
  window: int = 1
  num_random: int = 2
  seed: int = 0
  causal: bool = False

  def __post_init__(self):
    _check_shape(self.shape)
    _check_ints("BigBirdMask", block=(self.block, 1), num_global=(self.num_global, 0),
                window=(self.window, 0), num_random=(self.num_random, 0), seed=(self.seed, 0))
    nq, nk = -(-self.shape[0] // self.block), -(-self.shape[1] // self.block)
    qb, kb = np.arange(nq)[:, None], np.arange(nk)[None, :]
    table = (qb < self.num_global) | (kb < self.num_global) | (np.abs(qb - kb) <= self.window)
    rng = np.random.default_rng(self.seed)
    for i in range(nq):
      table[i, rng.choice(nk, min(self.num_random, nk), replace=False)] = True
    object.__setattr__(self, "_table", table)

  def _key(self):
    return (self.shape, self.block, self.num_global, self.window, self.num_random, self.seed,
            self.causal)

  _closed_form = True

  def _eval(self, q, kv, xp):
    out = xp.asarray(self._table)[q // self.block, kv // self.block]
    return out & (kv <= q) if self.causal else out

  def _any_all(self, block_q, block_kv):
    # Layout block (I, J) covers pattern blocks [a0, a1) x [b0, b1): count them in a prefix sum.
    (q_len, kv_len), table = self.shape, self._table
    counts = np.zeros((table.shape[0] + 1, table.shape[1] + 1), np.int64)
    counts[1:, 1:] = table.cumsum(axis=0).cumsum(axis=1)
    a0 = np.arange(0, q_len, block_q) // self.block
    a1 = np.arange(block_q - 1, q_len, block_q) // self.block + 1
    b0 = np.arange(0, kv_len, block_kv) // self.block
    b1 = np.arange(block_kv - 1, kv_len, block_kv) // self.block + 1
    count = (counts[np.ix_(a1, b1)] - counts[np.ix_(a0, b1)] - counts[np.ix_(a1, b0)]
             + counts[np.ix_(a0, b0)])
    tables = count > 0, count == (a1 - a0)[:, None] * (b1 - b0)[None, :]
    if not self.causal:
      return tables
    return _and_tables(tables, CausalMask(self.shape)._any_all(block_q, block_kv), self,
                       block_q, block_kv)


@dataclasses.dataclass(frozen=True, eq=False)
class VerticalSlashMask(_TableMask):
  """MInference's vertical-slash pattern: chosen key columns and chosen diagonals.

  Query ``i`` attends (causally) to key ``j`` if ``j`` is in `vertical` or
  ``i - j`` is in `slash`.

  Reference: MInference 1.0: Accelerating Pre-filling for Long-Context LLMs
  via Dynamic Sparse Attention. Jiang et al., 2024. arXiv:2407.02490.
  """

  shape: tuple[int, int]
  vertical: tuple[int, ...]
  slash: tuple[int, ...]

  def __post_init__(self):
    _check_shape(self.shape)
    for name, values, length in [("vertical", self.vertical, self.shape[1]),
                                 ("slash", self.slash, None)]:
      bad = [v for v in values if not _checks.is_int(v) or v < 0 or (length is not None and v >= length)]
      if bad:
        allowed = f"key indices in [0, {length})" if length else "diagonal offsets >= 0"
        raise ValueError(f"VerticalSlashMask: {name}={tuple(values)!r} must hold {allowed}, "
                         f"got {bad[:5]}")
    vertical, slash = np.zeros(self.shape[1], bool), np.zeros(self.shape[0], bool)
    vertical[list(self.vertical)] = True
    slash[[s for s in self.slash if 0 <= s < self.shape[0]]] = True
    object.__setattr__(self, "vertical", tuple(int(v) for v in self.vertical))
    object.__setattr__(self, "slash", tuple(int(s) for s in self.slash))
    object.__setattr__(self, "_tables", (vertical, slash))

  def _key(self):
    return (self.shape, self.vertical, self.slash)

  _closed_form = True  # blocks where columns and diagonals are both partial are evaluated

  def _any_all(self, block_q, block_kv):
    (q_len, kv_len), (vertical, slash) = self.shape, self._tables
    columns = _and_tables(_column_tables(vertical, q_len // block_q, block_kv),
                          CausalMask(self.shape)._any_all(block_q, block_kv),
                          lambda q, kv: vertical[kv] & (kv <= q), block_q, block_kv)
    # The differences q - kv in block (I, J) are every integer in
    # [I bq - J bkv - bkv + 1, I bq - J bkv + bq - 1]; count the chosen ones.
    chosen = np.concatenate([np.zeros(kv_len - 1, np.int64), slash.astype(np.int64)])
    count = np.concatenate([[0], np.cumsum(chosen)])
    lo = (np.arange(0, q_len, block_q)[:, None] - np.arange(0, kv_len, block_kv)[None, :]
          + kv_len - block_kv)
    n = count[lo + block_q + block_kv - 1] - count[lo]
    return _or_tables(columns, (n > 0, n == block_q + block_kv - 1), self, block_q, block_kv)

  def _eval(self, q, kv, xp):
    vertical, slash = (xp.asarray(t) for t in self._tables)
    offset = q - kv
    diagonal = slash[xp.clip(offset, 0, self.shape[0] - 1)] & (offset >= 0)
    return (kv <= q) & (vertical[kv] | diagonal)


@dataclasses.dataclass(frozen=True, eq=False)
class NumpyMask(_TableMask):
  """An arbitrary boolean (q_len, kv_len) array."""

  array: np.ndarray

  def __post_init__(self):
    a = np.asarray(self.array)
    if a.ndim != 2 or a.dtype != np.bool_ or 0 in a.shape:
      raise ValueError(f"NumpyMask needs a non-empty 2-D bool array, got {a.dtype} of shape "
                       f"{a.shape}")
    a = a.copy()
    a.setflags(write=False)  # the content hash below must stay true
    object.__setattr__(self, "array", a)
    object.__setattr__(self, "_digest", _hash_array(a))  # hashed once, not per lookup

  @property
  def shape(self):
    return self.array.shape

  def _key(self):
    return self._digest

  def _any_all(self, block_q, block_kv):
    (q_len, kv_len), a = self.shape, self.array
    tiles = a.reshape(q_len // block_q, block_q, kv_len // block_kv, block_kv)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))

  def _eval(self, q, kv, xp):
    return xp.asarray(self.array)[q, kv]


@dataclasses.dataclass(frozen=True)
class MultiHeadMask:
  """One mask per head, all of one shape.

  Example:
    >>> mask = sja.MultiHeadMask([sja.CausalMask((T, T)), sja.LocalMask((T, T), (64, 0))])
  """

  masks: tuple[Mask, ...]

  def __post_init__(self):
    masks = tuple(self.masks)
    if not masks or not all(isinstance(m, Mask) for m in masks):
      raise ValueError("MultiHeadMask needs a non-empty sequence of masks")
    if len({m.shape for m in masks}) != 1:
      raise ValueError(f"head masks differ in shape: {sorted({m.shape for m in masks})}")
    object.__setattr__(self, "masks", masks)

  @property
  def shape(self):
    return self.masks[0].shape

  def __len__(self):
    return len(self.masks)

  def __getitem__(self, head: int) -> Mask:
    return self.masks[head]

  def __bool__(self):
    raise ValueError("a mask has no truth value: combine masks with & and |, not and/or")


def kv_head_needed(mask: Mask | MultiHeadMask, at, pos, *, kv_heads: int):
  """bool[batch, kv_heads, ...]: keys some query head of each KV head may read from `at` on.

  A superset where a mask has no exact rule (`Mask._needed`). `at` is
  int[batch, 1, ...], `pos` int[batch, kv_heads or 1, ...] (broadcast
  together); a `MultiHeadMask` has a multiple of `kv_heads` heads, grouped
  in order (GQA), and repeated masks are evaluated once.
  """

  def needed(m, a, p):
    return m._needed(a, p, jnp) & (p < m.shape[1])  # pylint: disable=protected-access
  if isinstance(mask, Mask):
    need = needed(mask, at, pos)
    return jnp.broadcast_to(need, (need.shape[0], kv_heads, *need.shape[2:]))
  if len(mask) % kv_heads:
    raise ValueError(f"mask has {len(mask)} heads; it must be a multiple of kv_heads={kv_heads}")
  groups = len(mask) // kv_heads
  out = []
  for h in range(kv_heads):
    p = pos[:, min(h, pos.shape[1] - 1)]
    group = dict.fromkeys(mask.masks[h * groups:(h + 1) * groups])  # distinct, in order
    need = [needed(m, at[:, 0], p) for m in group]
    out.append(functools.reduce(lambda a, b: a | b, need))
  return jnp.stack(out, axis=1)


def as_head_masks(mask: Mask | MultiHeadMask | Sequence[Mask], num_heads: int) -> tuple[Mask, ...]:
  """One mask per head: a single mask is shared by every head."""
  if isinstance(mask, Mask):
    return (mask,) * num_heads
  if not isinstance(mask, (MultiHeadMask, list, tuple)):
    hint = "; wrap a bool array with sja.NumpyMask" if isinstance(mask, np.ndarray) else ""
    raise ValueError(f"mask must be a sja.Mask, a sja.MultiHeadMask or a sequence of masks, got "
                     f"{type(mask).__name__}{hint}")
  if not isinstance(mask, MultiHeadMask):
    mask = MultiHeadMask(tuple(mask))
  if len(mask) != num_heads:
    raise ValueError(f"the mask has {len(mask)} heads, expected num_heads={num_heads}")
  return mask.masks

