"""Attention masks: which (query, key) positions may attend.

A mask is a small immutable, hashable description. It evaluates with NumPy on
the host (``mask[q_slice, kv_slice]``, to build layouts) and, through the
same code, with jnp on traced indices (``mask(q_ids, kv_ids)``), so partial
blocks can be recomputed inside kernels. Masks compose with ``&`` and ``|``;
``bool(mask)`` raises, to catch ``and``/``or`` used by mistake.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import numpy as np

from sparsejax._src import _checks


def _xp(*arrays):
  """NumPy for NumPy inputs, jax.numpy for anything traced or on device."""
  if any(isinstance(a, (jax.Array, jax.core.Tracer)) for a in arrays):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp
  return np


def _check_ints(owner, **values):
  """Raises ValueError unless each value is an integer >= its minimum (None: any integer)."""
  for name, (value, minimum) in values.items():
    _checks.static_int(f"{owner}: {name}", value, minimum=minimum)


def _check_shape(shape):
  if (not isinstance(shape, tuple) or len(shape) != 2
      or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape)):
    raise ValueError(f"shape={shape!r} must be (q_len, kv_len) with positive ints")


class Mask:
  """Base class: a boolean (q_len, kv_len) pattern."""

  shape: tuple[int, int]

  def _eval(self, q, kv, xp):
    raise NotImplementedError

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

  def _eval(self, q, kv, xp):
    return self.left._eval(q, kv, xp) & self.right._eval(q, kv, xp)  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class LogicalOr(Mask):
  left: Mask
  right: Mask

  @property
  def shape(self):
    return self.left.shape

  def _eval(self, q, kv, xp):
    return self.left._eval(q, kv, xp) | self.right._eval(q, kv, xp)  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every query attends to every key."""

  shape: tuple[int, int]

  def __post_init__(self):
    _check_shape(self.shape)

  def _eval(self, q, kv, xp):
    return xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """Query ``i`` attends to keys ``j <= i + offset``."""

  shape: tuple[int, int]
  offset: int = 0

  def __post_init__(self):
    _check_shape(self.shape)
    _check_ints("CausalMask", offset=(self.offset, None))

  def _eval(self, q, kv, xp):
    return kv <= q + self.offset


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

  def _eval(self, q, kv, xp):
    left, right = self.window
    out = xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)
    if left is not None:
      out = out & (kv >= q + self.offset - left)
    if right is not None:
      out = out & (kv <= q + self.offset + right)
    return out


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
  """Causal attention inside consecutive chunks of `chunk` positions."""

  shape: tuple[int, int]
  chunk: int

  def __post_init__(self):
    _check_shape(self.shape)
    if not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
      raise ValueError(f"chunk={self.chunk!r} must be an int >= 1")

  def _eval(self, q, kv, xp):
    return (q // self.chunk == kv // self.chunk) & (kv <= q)


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

  def _eval(self, q, kv, xp):
    return (kv <= q) & ((kv < self.sink) | (q - kv < self.window))


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

  def _eval(self, q, kv, xp):
    out = ((kv // self.block) % self.num_shards == self.shard) | (
        (q - kv < self.local_window) & (kv - q < self.local_window))
    return out & (kv <= q) if self.causal else out

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

  def _eval(self, q, kv, xp):
    out = xp.asarray(self._table)[q // self.block, kv // self.block]
    return out & (kv <= q) if self.causal else out


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

