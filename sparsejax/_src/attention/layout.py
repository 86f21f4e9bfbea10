"""Block-sparse attention layouts: which key blocks each query block reads.

`make_layout` classifies a mask's blocks on the host (in closed form for the
structured masks, evaluating only the partial blocks' elements) and caches
the result; `topk_layout` builds one inside `jax.jit` from pooled
query and key blocks. Both return a `Layout`, a NamedTuple of int32/bool
arrays whose shapes carry the block sizes, so every implementation accepts
either. A layout made from masks that are computable in a kernel (no tables:
`kernel_masks`) also carries them, as static pytree data: the Pallas kernels
evaluate its partial blocks from them instead of loading the element-mask
table, so a new mask of the same sizes recompiles the kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import masks as masks_lib


class Layout(NamedTuple):
  """Block-sparse attention metadata (a pytree of arrays).

  Rows are distinct head patterns: heads that share a mask share a row, and
  `head_row` maps (batch, head) to a row. Lists are sorted ascending and
  padded to a fixed length by repeating their last entry (so a kernel that
  prefetches the next block re-reads the same one).

  Attributes:
    num_kv: int32[rows, q_blocks]: active key blocks per query block.
    kv_index: int32[rows, q_blocks, max_kv]: those key blocks.
    kv_partial: int32[rows, q_blocks, max_kv]: for each, the index of its
      element mask in `partial`, or -1 if the block is fully visible.
    num_q: int32[rows, kv_blocks]: active query blocks per key block (the
      transposed lists, for the dK/dV pass).
    q_index: int32[rows, kv_blocks, max_q]: those query blocks.
    q_partial: int32[rows, kv_blocks, max_q]: their element-mask indices.
    partial: bool[num_partial, block_q, block_kv]: distinct partial blocks
      (one all-True block when there are none).
    head_row: int32[batch or 1, heads]: the row of each (batch, head).
    masks: the mask of each row, when every one is computable inside a
      kernel (`kernel_masks`), else None. Static: pytree aux data, not a
      leaf, so jit specializes on it and tree maps leave it as it is.
  """

  num_kv: jax.Array
  kv_index: jax.Array
  kv_partial: jax.Array
  num_q: jax.Array
  q_index: jax.Array
  q_partial: jax.Array
  partial: jax.Array
  head_row: jax.Array
  masks: tuple[masks_lib.Mask, ...] | None = None

  @property
  def block_q(self) -> int:
    return self.partial.shape[1]

  @property
  def block_kv(self) -> int:
    return self.partial.shape[2]

  @property
  def num_heads(self) -> int:
    return self.head_row.shape[1]

  @property
  def q_len(self) -> int:
    return self.num_kv.shape[1] * self.block_q

  @property
  def kv_len(self) -> int:
    return self.num_q.shape[1] * self.block_kv

  def density(self) -> jax.Array:
    """Share of (query block, key block) pairs that are active, averaged over heads."""
    rows = jnp.take(self.num_kv, self.head_row.reshape(-1), axis=0)
    return jnp.mean(rows) / self.num_q.shape[1]

  @property
  def sparsity(self) -> jax.Array:
    """Share of (query block, key block) pairs that are inactive, averaged over heads.

    ``1 - density()``; traceable.

    Example:
      >>> sja.make_layout(sja.CausalMask((512, 512)), num_heads=1, block_q=128,
      ...                 block_kv=128).sparsity          # 6 of 16 blocks are empty
      Array(0.375, dtype=float32)
    """
    return 1 - self.density()

  def to_string(self, head: int = 0, *, batch: int = 0, max_blocks: int = 64) -> str:
    """A text picture of one head's blocks: '██' full, '░░' partial, '  ' empty.

    Rows are query blocks, columns key blocks. Past `max_blocks` per side a
    character pair stands for several blocks: full if all are, partial if any
    is active. Host-side (not under jit).

    Args:
      head: the head to draw.
      batch: the batch element (layouts with a row per batch, as from
        `topk_layout` or `segment_layout`).
      max_blocks: the most blocks drawn per side.

    Example:
      >>> print(sja.make_layout(sja.CausalMask((512, 512)), num_heads=1, block_q=128,
      ...                       block_kv=128).to_string())
      head 0: 4 x 4 blocks of 128 x 128, sparsity 37.50%
      |░░      |
      |██░░    |
      |████░░  |
      |██████░░|
    """
    _checks.static_int("max_blocks", max_blocks, minimum=1)
    states = _block_states(self, _row(self, head, batch))
    (nq, nk), sparsity = states.shape, float(np.mean(states == _EMPTY))
    step_q, step_k = -(-nq // max_blocks), -(-nk // max_blocks)
    active = _pool(states != _EMPTY, step_q, step_k, np.any)
    full = _pool(states == _FULL, step_q, step_k, np.all)
    cells = np.where(full, "██", np.where(active, "░░", "  "))
    title = (f"head {head}{f', batch {batch}' if self.head_row.shape[0] > 1 else ''}: "
             f"{nq} x {nk} blocks of {self.block_q} x {self.block_kv}, sparsity {sparsity:.2%}")
    if step_q > 1 or step_k > 1:
      title += f" (a cell: {step_q} x {step_k} blocks)"
    return "\n".join([title] + ["|" + "".join(r) + "|" for r in cells])


_ARRAY_FIELDS = Layout._fields[:-1]


def _flatten(layout: Layout):
  return ([(jax.tree_util.GetAttrKey(f), getattr(layout, f)) for f in _ARRAY_FIELDS],
          layout.masks)


jax.tree_util.register_pytree_with_keys(
    Layout, _flatten, lambda masks, arrays: Layout(*arrays, masks=masks))


# What a mask evaluated inside a kernel may do: elementwise integer and boolean
# ops that both the Triton and the Mosaic lowerings have.
_KERNEL_OPS = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "and", "or", "not", "xor", "eq", "ne",
    "lt", "le", "gt", "ge", "select_n", "broadcast_in_dim", "convert_element_type", "iota",
    "reshape", "squeeze", "expand_dims", "jit", "pjit"})


def _kernel_ops_only(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name not in _KERNEL_OPS:
      return False
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)  # a ClosedJaxpr's, or a Jaxpr
      if hasattr(inner, "eqns") and not _kernel_ops_only(inner):
        return False
  return True


def kernel_masks(head_masks, block_q: int, block_kv: int) -> tuple[masks_lib.Mask, ...] | None:
  """`head_masks` as a tuple if every one evaluates inside a kernel, else None.

  A mask does when its traced evaluation on int32 positions captures no array
  and uses only elementwise integer and boolean ops (the structured masks
  and their ``&``/``|``); `BigBirdMask`, `VerticalSlashMask` and `NumpyMask`
  index tables, which a kernel cannot capture, so their layouts keep to the
  element-mask table, as do masks that do not trace.
  """
  q = jax.ShapeDtypeStruct((block_q, 1), jnp.int32)
  kv = jax.ShapeDtypeStruct((1, block_kv), jnp.int32)
  for m in head_masks:
    try:
      traced = jax.make_jaxpr(lambda q, kv, m=m: m(q, kv))(q, kv)
    except Exception:  # pylint: disable=broad-except  # e.g. NumPy code on a tracer: the table
      return None
    if traced.consts or not _kernel_ops_only(traced.jaxpr):
      return None
  return tuple(head_masks)


_EMPTY, _PARTIAL, _FULL = 0, 1, 2


def _row(layout: Layout, head: int, batch: int) -> int:
  """The layout row of (batch, head); raises ValueError out of range."""
  batches, heads = layout.head_row.shape
  _checks.static_int("head", head, minimum=0)
  _checks.static_int("batch", batch, minimum=0)
  if head >= heads:
    raise ValueError(f"head={head} must be < num_heads={heads}")
  if batches > 1 and batch >= batches:
    raise ValueError(f"batch={batch} must be < {batches}, the layout's batch")
  return int(np.asarray(layout.head_row)[batch if batches > 1 else 0, head])


def _block_states(layout: Layout, row: int) -> np.ndarray:
  """int8[q_blocks, kv_blocks]: _EMPTY, _PARTIAL or _FULL for one layout row (host-side)."""
  num_kv = np.asarray(layout.num_kv[row])
  kv_index, kv_partial = np.asarray(layout.kv_index[row]), np.asarray(layout.kv_partial[row])
  states = np.full((num_kv.shape[0], layout.num_q.shape[1]), _EMPTY, np.int8)
  valid = np.arange(kv_index.shape[1]) < num_kv[:, None]
  q_blocks = np.broadcast_to(np.arange(num_kv.shape[0])[:, None], valid.shape)
  states[q_blocks[valid], kv_index[valid]] = np.where(kv_partial[valid] >= 0, _PARTIAL, _FULL)
  return states


def _pool(table: np.ndarray, step_q: int, step_k: int, reduce) -> np.ndarray:
  """`reduce` over (step_q, step_k) cells of a bool table (cells cut at the edges)."""
  nq, nk = table.shape
  padded = np.full((-(-nq // step_q) * step_q, -(-nk // step_k) * step_k),
                   reduce is np.all)  # padding that changes no cell
  padded[:nq, :nk] = table
  cells = padded.reshape(padded.shape[0] // step_q, step_q, padded.shape[1] // step_k, step_k)
  return reduce(cells, axis=(1, 3))


def plot_layout(layout: Layout, path, *, heads=None, batch: int = 0):
  """Writes a PNG (or any format matplotlib infers from `path`) of the layout's blocks per head.

  Full blocks are dark, partial light, empty white; each panel is titled with
  its head and sparsity. Imports matplotlib (the test/examples extra).

  Args:
    layout: a `Layout` (concrete, not under jit).
    path: the file to write.
    heads: the heads to draw (default: all).
    batch: the batch element, for layouts with a row per batch.

  Returns:
    `path`.

  Example:
    >>> sja.plot_layout(layout, "layout.png", heads=[0, 1])
  """
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  heads = list(range(layout.num_heads)) if heads is None else list(heads)
  if not heads:
    raise ValueError("heads must name at least one head")
  states = [_block_states(layout, _row(layout, h, batch)) for h in heads]
  cols = min(len(heads), 4)
  rows = -(-len(heads) // cols)
  fig = figure.Figure(figsize=(3 * cols, 3 * rows), layout="constrained")
  cmap = colors.ListedColormap(["white", "#9ecae1", "#08519c"])
  for n, (h, table) in enumerate(zip(heads, states)):
    ax = fig.add_subplot(rows, cols, n + 1)
    ax.imshow(table, cmap=cmap, vmin=_EMPTY, vmax=_FULL, interpolation="nearest")
    ax.set_title(f"head {h}: sparsity {np.mean(table == _EMPTY):.1%}", fontsize=9)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
  fig.suptitle("dark: full blocks, light: partial, white: empty", fontsize=9)
  fig.savefig(path)
  return path


def max_pairs(layout: Layout) -> int | None:
  """The most active block pairs of any row of a concrete layout (None if traced)."""
  if not _checks.is_concrete(layout.num_kv):
    return None
  return max(int(np.asarray(layout.num_kv).sum(-1).max()), 1)


def active_lists(active: jax.Array, partial_index: jax.Array, size: int):
  """Ascending indices of the active entries along the last axis (traceable).

  Args:
    active: bool[..., n].
    partial_index: int32[..., n]: a value per entry, kept where active.
    size: list length (static), at least the largest count.

  Returns:
    (count int32[...], index int32[..., size], partial int32[..., size]):
    lists padded by repeating their last index, with partial -1 in padding.
  """
  return _active_lists(jnp, active, partial_index, size)


def _active_lists(xp, active, partial_index, size):
  """`active_lists` with NumPy (on the host, nothing to compile) or jax.numpy."""
  count = xp.sum(active, axis=-1, dtype=xp.int32)
  order = xp.argsort(~active, axis=-1, stable=True).astype(xp.int32)
  slot = xp.broadcast_to(xp.arange(size, dtype=xp.int32), count.shape + (size,))
  take = xp.minimum(slot, xp.maximum(count[..., None] - 1, 0))
  index = xp.take_along_axis(order, take, axis=-1)
  valid = slot < count[..., None]
  part = xp.where(valid, xp.take_along_axis(partial_index, index, axis=-1), -1)
  return count, index, part.astype(xp.int32)


def _block_lists(xp, active, partial_index, max_kv, max_q):
  """The six list fields of a `Layout` from its block tables."""
  return (*_active_lists(xp, active, partial_index, max_kv),
          *_active_lists(xp, xp.swapaxes(active, 1, 2), xp.swapaxes(partial_index, 1, 2), max_q))


def from_blocks(active: jax.Array, partial_index: jax.Array, partial: jax.Array,
                head_row: jax.Array, max_kv: int, max_q: int) -> Layout:
  """A `Layout` from block tables (traceable), without masks: kernels read `partial`.

  Args:
    active: bool[rows, q_blocks, kv_blocks]: blocks with any visible entry.
    partial_index: int32[rows, q_blocks, kv_blocks]: element mask of each
      block in `partial`, -1 where fully visible (ignored where inactive).
    partial: bool[num_partial, block_q, block_kv].
    head_row: int32[batch or 1, heads].
    max_kv, max_q: list lengths (static), at least the largest counts.
  """
  return Layout(*_block_lists(jnp, active, partial_index, max_kv, max_q),
                jnp.asarray(partial, jnp.bool_), jnp.asarray(head_row, jnp.int32))


def _mask_blocks(mask: masks_lib.Mask, block_q: int, block_kv: int):
  """Host-side: (active, partial index) per block and the distinct partial blocks.

  Masks with a closed form are classified in O(blocks) and only their partial
  blocks are evaluated; the others (`NumpyMask`, user masks) element by element.
  """
  if not mask._closed_form:  # pylint: disable=protected-access
    return _element_blocks(mask, block_q, block_kv)
  active, full = mask.block_any_all(block_q, block_kv)
  q_blocks, kv_blocks = np.nonzero(active & ~full)  # row-major, like the element path
  pidx = np.full(active.shape, -1, np.int32)
  if not len(q_blocks):
    return active, pidx, []
  packed = np.empty((len(q_blocks), -(-block_q * block_kv // 8)), np.uint8)
  for s, entries in masks_lib.iter_block_elements(mask, q_blocks, kv_blocks, block_q, block_kv):
    packed[s] = np.packbits(entries.reshape(len(entries), -1), axis=1)
  seen: dict[bytes, int] = {}  # distinct blocks numbered in order of first appearance
  pidx[q_blocks, kv_blocks] = [seen.setdefault(row.tobytes(), len(seen)) for row in packed]
  first = np.unique(pidx[q_blocks, kv_blocks], return_index=True)[1]
  patterns = np.unpackbits(packed[first], axis=1, count=block_q * block_kv)
  return active, pidx, list(patterns.reshape(-1, block_q, block_kv).astype(bool))


def _element_blocks(mask: masks_lib.Mask, block_q: int, block_kv: int):
  q_len, kv_len = mask.shape
  nq, nk = q_len // block_q, kv_len // block_kv
  active = np.zeros((nq, nk), bool)
  pidx = np.full((nq, nk), -1, np.int32)
  seen: dict[bytes, int] = {}
  patterns = []
  for i in range(nq):
    rows = mask[i * block_q:(i + 1) * block_q, :].reshape(block_q, nk, block_kv)
    rows = np.swapaxes(rows, 0, 1)  # (nk, block_q, block_kv)
    any_on, all_on = rows.any(axis=(1, 2)), rows.all(axis=(1, 2))
    active[i] = any_on
    for j in np.nonzero(any_on & ~all_on)[0]:
      key = np.packbits(rows[j]).tobytes()
      if key not in seen:
        seen[key] = len(patterns)
        patterns.append(rows[j])
      pidx[i, j] = seen[key]
  return active, pidx, patterns


@functools.lru_cache(maxsize=64)
def _cached_layout(head_masks: tuple[masks_lib.Mask, ...], block_q: int, block_kv: int) -> Layout:
  unique: dict[masks_lib.Mask, int] = {}
  for m in head_masks:
    unique.setdefault(m, len(unique))
  head_row = np.array([[unique[m] for m in head_masks]], np.int32)
  tables, patterns, offsets = [], [], []
  for m in unique:
    active, pidx, pats = _mask_blocks(m, block_q, block_kv)
    offsets.append(len(patterns))
    patterns.extend(pats)
    tables.append((active, np.where(pidx >= 0, pidx + offsets[-1], -1)))
  active = np.stack([t[0] for t in tables])
  pidx = np.stack([t[1] for t in tables]).astype(np.int32)
  partial = np.stack(patterns) if patterns else np.ones((1, block_q, block_kv), bool)
  max_kv = max(int(active.sum(-1).max()), 1)
  max_q = max(int(active.sum(-2).max()), 1)
  lists = _block_lists(np, active, pidx, max_kv, max_q)  # what from_blocks computes, on the host
  masks = kernel_masks(tuple(unique), block_q, block_kv)
  with jax.ensure_compile_time_eval():
    return Layout(*(jnp.asarray(a) for a in lists + (partial, head_row)), masks=masks)


def make_layout(mask: masks_lib.Mask | masks_lib.MultiHeadMask, *, num_heads: int,
                block_q: int = 128, block_kv: int = 128) -> Layout:
  """The block-sparse layout of `mask` for `num_heads` heads (host-side, cached).

  Args:
    mask: a `Mask` shared by every head, or a `MultiHeadMask` of one per head.
    num_heads: query heads.
    block_q, block_kv: block sizes; they must divide the sequence lengths.

  Returns:
    a `Layout`; the same arguments return the same (cached) object. Its
    `masks` are the rows' masks if all are computable in a kernel.

  Example:
    >>> mask = sja.CausalMask((T, T)) & sja.LocalMask((T, T), window=(1024, 0))
    >>> layout = sja.make_layout(mask, num_heads=H, block_q=128, block_kv=128)
  """
  for name, value in [("num_heads", num_heads), ("block_q", block_q), ("block_kv", block_kv)]:
    _checks.static_int(name, value, minimum=1)
  head_masks = masks_lib.as_head_masks(mask, num_heads)
  q_len, kv_len = head_masks[0].shape
  if q_len % block_q:
    raise ValueError(f"{q_len=} must be a multiple of {block_q=}")
  if kv_len % block_kv:
    raise ValueError(f"{kv_len=} must be a multiple of {block_kv=}")
  return _cached_layout(head_masks, int(block_q), int(block_kv))


def block_tables(layout: Layout) -> tuple[jax.Array, jax.Array]:
  """The block tables a layout's lists encode (traceable; the inverse of `from_blocks`).

  Returns:
    (active bool[rows, q_blocks, kv_blocks], partial index int32[rows,
    q_blocks, kv_blocks]: -1 where fully visible or inactive).
  """
  rows, nq, max_kv = layout.kv_index.shape
  nk = layout.num_q.shape[1]
  valid = jnp.arange(max_kv)[None, None, :] < layout.num_kv[..., None]
  r = jnp.broadcast_to(jnp.arange(rows)[:, None, None], valid.shape)
  q = jnp.broadcast_to(jnp.arange(nq)[None, :, None], valid.shape)
  # Padding repeats a valid entry, so scattering it again changes nothing.
  active = jnp.zeros((rows, nq, nk), bool).at[r, q, layout.kv_index].max(valid)
  pidx = jnp.full((rows, nq, nk), -1, jnp.int32).at[r, q, layout.kv_index].max(
      jnp.where(valid, layout.kv_partial, -1))
  return active, pidx


def dense_mask(layout: Layout) -> jax.Array:
  """bool[rows, q_len, kv_len]: the element mask a layout encodes (traceable)."""
  rows, nq, _ = layout.kv_index.shape
  active, pidx = block_tables(layout)
  blocks = jnp.where(pidx[..., None, None] >= 0,
                     layout.partial[jnp.maximum(pidx, 0)], active[..., None, None])
  blocks = blocks & active[..., None, None]
  return blocks.transpose(0, 1, 3, 2, 4).reshape(rows, layout.q_len, layout.kv_len)


def topk_layout(q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, k_blocks: int,
                causal: bool = False) -> Layout:
  """A content-routed layout built inside jit: each query block reads `k_blocks` key blocks.

  Query and key blocks are mean-pooled; each (batch, head, query block) keeps
  the `k_blocks` key blocks with the largest pooled dot products (BiFormer /
  Routing Transformer style). With ``causal=True`` only blocks on or below the
  diagonal compete, the diagonal one is always kept and masked causally.
  Shapes are static, so the layout can change every step without recompiling.

  Args:
    q: [batch, q_len, heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim] (kv_heads divides heads).
    block_q, block_kv: block sizes dividing the lengths.
    k_blocks: key blocks per query block.
    causal: restrict to the causal triangle (needs block_q == block_kv).

  Returns:
    a `Layout` with one row per (batch, head).

  Example:
    >>> layout = sja.topk_layout(q, k, block_q=64, block_kv=64, k_blocks=4)
  """
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q and k must be [batch, seq, heads, head_dim], got {q.shape=} and "
                     f"{k.shape=}")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"k must be [{q.shape[0]}, kv_len, kv_heads, {q.shape[3]}] to match q, "
                     f"got {k.shape=}")
  for name, value in [("block_q", block_q), ("block_kv", block_kv), ("k_blocks", k_blocks)]:
    _checks.static_int(name, value, minimum=1)
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if kv_heads < 1:
    raise ValueError(f"k has {kv_heads} heads; kv_heads must be >= 1")
  if q_len % block_q or kv_len % block_kv:
    raise ValueError(f"{q_len=} and {kv_len=} must be multiples of {block_q=} and {block_kv=}")
  if heads % kv_heads:
    raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
  nq, nk = q_len // block_q, kv_len // block_kv
  if not 1 <= k_blocks <= nk:
    raise ValueError(f"k_blocks={k_blocks} must be in [1, {nk}]")
  if causal and block_q != block_kv:
    raise ValueError(f"causal routing needs block_q == block_kv, got {block_q}, {block_kv}")
  pq = q.reshape(batch, nq, block_q, heads, dim).mean(2).astype(jnp.float32)
  pk = k.reshape(batch, nk, block_kv, kv_heads, dim).mean(2).astype(jnp.float32)
  pk = jnp.repeat(pk, heads // kv_heads, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", pq, pk)
  qb = jnp.broadcast_to(jnp.arange(nq)[:, None], scores.shape)
  kb = jnp.broadcast_to(jnp.arange(nk)[None, :], scores.shape)
  if causal:
    scores = jnp.where(kb == qb, jnp.inf, jnp.where(kb < qb, scores, -jnp.inf))
  _, top = jax.lax.top_k(scores, k_blocks)
  chosen = jnp.take_along_axis(scores, top, axis=-1) > -jnp.inf
  active = jnp.zeros(scores.shape, bool).at[
      jnp.arange(batch)[:, None, None, None], jnp.arange(heads)[None, :, None, None],
      jnp.arange(nq)[None, None, :, None], top].set(chosen)
  active = active.reshape(batch * heads, nq, nk)
  if causal:
    pidx = jnp.where(kb == qb, 0, -1).reshape(active.shape).astype(jnp.int32)
    partial = np.tril(np.ones((block_q, block_kv), bool))[None]
  else:
    pidx = jnp.full(active.shape, -1, jnp.int32)
    partial = np.ones((1, block_q, block_kv), bool)
  head_row = jnp.arange(batch * heads, dtype=jnp.int32).reshape(batch, heads)
  return from_blocks(active, pidx, jnp.asarray(partial), head_row, k_blocks, nq)
