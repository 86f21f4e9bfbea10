"""MInference's vertical-slash pattern, estimated inside jit, and a layout's recall.

`estimate_vertical_slash` looks at the softmax of a prompt's last queries,
picks per (batch, head) the key columns (vertical lines) and diagonals
(slash lines) that hold the most attention mass, and turns them into a
`Layout` with a fixed budget of key blocks per query block, so that every
implementation of `block_sparse_attention` runs it. `layout_recall` measures
how much of full attention's softmax mass a layout keeps.

Reference: MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention. Jiang et al., 2024. arXiv:2407.02490.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import masks as masks_lib


def _check_qk(q, k, sm_scale) -> float:
  """q and k as `block_sparse_attention` takes them; returns the softmax scale."""
  if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
    raise ValueError(f"q and k must be 4-D arrays [batch, seq, heads, head_dim], got "
                     f"q: {getattr(q, 'shape', q)!r}, k: {getattr(k, 'shape', k)!r}")
  (batch, _, heads, dim), (kv_batch, _, kv_heads, kv_dim) = q.shape, k.shape
  if (kv_batch, kv_dim) != (batch, dim) or kv_heads < 1 or heads % kv_heads:
    raise ValueError(f"k.shape={k.shape} must be [{batch}, kv_len, kv_heads, {dim}] with "
                     f"kv_heads dividing the {heads} query heads of q.shape={q.shape}")
  if sm_scale is None:
    return 1.0 / math.sqrt(dim)
  _checks.static_float("sm_scale", sm_scale)
  return float(sm_scale)


def _probs(q, k, visible, sm_scale):
  """float32[batch, heads, q_len, kv_len]: softmax over visible keys; 0 in empty rows."""
  kf = jnp.repeat(k.astype(jnp.float32), q.shape[2] // k.shape[2], axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
  return jax.nn.softmax(s, axis=-1, where=visible)


def _keep_top(mass, n):
  """mass [batch, heads, lines] with all but each row's `n` heaviest lines set to 0."""
  if n == 0:
    return jnp.zeros_like(mass)
  values, index = jax.lax.top_k(mass, n)
  b, h = np.ogrid[:mass.shape[0], :mass.shape[1]]
  return jnp.zeros_like(mass).at[b[..., None], h[..., None], index].set(values)


def _slash_blocks(slash, q_len, kv_len, block_q, block_kv):
  """[batch, heads, q_blocks, kv_blocks]: per query row, the diagonals' mass in each block.

  `slash[..., o + kv_len - 1]` is the mass of the diagonal q - kv = o. Row
  ``i bq + r`` of query block i meets diagonal o in key block j iff
  ``base + r - bkv < o <= base + r`` with ``base = i bq - j bkv``, so the
  block's share is a sum of windowed sums: two cumulative sums, O(T + blocks).
  """
  lines = slash.shape[-1]  # q_len + kv_len - 1
  pad = jnp.zeros(slash.shape[:-1] + (block_kv + 1,), slash.dtype)
  c = jnp.concatenate([pad, jnp.cumsum(slash, axis=-1)], axis=-1)
  window = c[..., block_kv + 1:] - c[..., 1:lines + 1]  # diagonals (n - bkv, n]
  d = jnp.concatenate([pad[..., :1], jnp.cumsum(window, axis=-1)], axis=-1)
  lo = (np.arange(0, q_len, block_q)[:, None] - np.arange(0, kv_len, block_kv)[None, :]
        + kv_len - 1)
  return (d[..., lo + block_q] - d[..., lo]) / block_q


def estimate_vertical_slash(q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int,
                            k_blocks: int, num_vertical: int, num_slash: int,
                            causal: bool, last_q: int = 64,
                            sm_scale: float | None = None) -> layout_lib.Layout:
  """A vertical-slash layout estimated inside jit from the last `last_q` queries.

  Per (batch, head): the softmax of the last `last_q` queries over all keys
  (causal at their positions: query i sees keys j <= i, as `CausalMask`),
  summed per key column and per diagonal ``q - kv``; the `num_vertical`
  heaviest columns and `num_slash` heaviest diagonals are kept. Each key
  block then scores the chosen columns' mass it holds plus, per query row,
  the chosen diagonals' mass crossing it, and each query block keeps its
  `k_blocks` best key blocks; budget that no chosen line needs goes to the
  first blocks (the attention sink first). With ``causal=True`` only blocks
  on or below the diagonal compete and the diagonal block (the local
  window) is always kept, masked causally; every other block is full.
  Shapes are static, so a new prompt needs no recompile; memory is
  O(last_q * kv_len + q_blocks * kv_blocks) per head.

  Args:
    q: [batch, q_len, heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim] (kv_heads divides heads).
    block_q, block_kv: block sizes dividing the lengths.
    k_blocks: key blocks per query block, the fixed budget.
    num_vertical: key columns kept per head (0 for none).
    num_slash: diagonals kept per head (0 for none).
    last_q: the queries the pattern is estimated from (MInference uses 64).
    causal: causal attention (needs block_q == block_kv). Required: a
      prompt of a causal model needs True, and a wrong guess would let the
      layout attend to the future.
    sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.

  Returns:
    a `Layout` with one row per (batch, head).

  Example:
    >>> layout = sja.estimate_vertical_slash(q, k, block_q=64, block_kv=64, k_blocks=8,
    ...                                      num_vertical=256, num_slash=64, causal=True)
    >>> out = sja.block_sparse_attention(q, k, v, layout)
  """
  sm_scale = _check_qk(q, k, sm_scale)
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  for name, value, minimum in [("block_q", block_q, 1), ("block_kv", block_kv, 1),
                               ("k_blocks", k_blocks, 1), ("num_vertical", num_vertical, 0),
                               ("num_slash", num_slash, 0), ("last_q", last_q, 1)]:
    _checks.static_int(name, value, minimum=minimum)
  if q_len % block_q or kv_len % block_kv:
    raise ValueError(f"{q_len=} and {kv_len=} must be multiples of {block_q=} and {block_kv=}")
  nq, nk = q_len // block_q, kv_len // block_kv
  for name, value, most, what in [("k_blocks", k_blocks, nk, "the key blocks"),
                                  ("num_vertical", num_vertical, kv_len, "kv_len"),
                                  ("num_slash", num_slash, q_len + kv_len - 1, "the diagonals"),
                                  ("last_q", last_q, q_len, "q_len")]:
    if value > most:
      raise ValueError(f"{name}={value} must be <= {most} ({what})")
  if causal and block_q != block_kv:
    raise ValueError(f"causal=True needs block_q == block_kv, got {block_q=}, {block_kv=}")
  offset = np.arange(q_len - last_q, q_len)[:, None] - np.arange(kv_len)[None, :]
  visible = offset >= 0 if causal else np.ones_like(offset, bool)
  p = _probs(q[:, q_len - last_q:], k, visible[None, None], sm_scale)
  vertical = _keep_top(p.sum(2), num_vertical)
  slash = jnp.zeros((batch, heads, q_len + kv_len - 1)).at[:, :, offset + kv_len - 1].add(p)
  scores = (vertical.reshape(batch, heads, 1, nk, block_kv).sum(-1)
            + _slash_blocks(_keep_top(slash, num_slash), q_len, kv_len, block_q, block_kv))
  qb, kb = np.ogrid[:nq, :nk]
  qb, kb = qb[None, None], kb[None, None]  # [1, 1, q_blocks, kv_blocks]
  if causal:
    scores = jnp.where(kb == qb, jnp.inf, jnp.where(kb < qb, scores, -jnp.inf))
  value, top = jax.lax.top_k(scores, k_blocks)
  at = [x[..., None] for x in np.ogrid[:batch, :heads, :nq]] + [top]
  active = jnp.zeros(scores.shape, bool).at[tuple(at)].set(value > -jnp.inf)
  active = active.reshape(batch * heads, nq, nk)
  diagonal = causal & (kb == qb)
  pidx = np.broadcast_to(np.where(diagonal[0], 0, -1).astype(np.int32), active.shape)
  partial = np.tril(np.ones((block_q, block_kv), bool)) | (not causal)  # all True if unused
  head_row = np.arange(batch * heads, dtype=np.int32).reshape(batch, heads)
  return layout_lib.from_blocks(active, pidx, partial[None], head_row, k_blocks, nq)


def _mask_table(mask, heads: int, shape: tuple[int, int]) -> np.ndarray:
  """bool[heads or 1, q_len, kv_len]: a mask's elements (host-side), one table per head."""
  head_masks = masks_lib.as_head_masks(mask, heads)
  if head_masks[0].shape != shape:
    raise ValueError(f"mask.shape={head_masks[0].shape} must be (q_len, kv_len) = {shape}")
  tables = {m: m.to_numpy() for m in head_masks}
  return np.stack([tables[m] for m in (head_masks[:1] if len(tables) == 1 else head_masks)])


def layout_recall(q: jax.Array, k: jax.Array, layout: layout_lib.Layout, *,
                  mask: masks_lib.Mask | masks_lib.MultiHeadMask | None = None,
                  sm_scale: float | None = None) -> jax.Array:
  """float32[batch, heads]: the share of full attention's softmax mass a layout keeps.

  The softmax of every query over the keys `mask` allows (all keys if None)
  is summed over the elements the layout covers, then averaged over query
  rows. Rows that `mask` leaves without keys hold no mass and are left out
  of the average; a head with no such row at all has recall 1. Dense: it
  builds [batch, heads, q_len, kv_len] scores and masks, O(T^2) memory, for
  evaluating layouts (traceable, with `mask` static).

  Args:
    q: [batch, q_len, heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim] (kv_heads divides heads).
    layout: a `Layout` for these lengths and heads.
    mask: the full attention to compare with: a `Mask` shared by every head
      or a `MultiHeadMask`, of shape (q_len, kv_len); None for no mask.
    sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.

  Returns:
    float32[batch, heads] in [0, 1]; 1 where the layout holds every element
    that `mask` allows.

  Example:
    >>> causal = sja.CausalMask((T, T))
    >>> full = sja.layout_recall(q, k, sja.make_layout(causal, num_heads=H), mask=causal)  # 1
  """
  sm_scale = _check_qk(q, k, sm_scale)
  if not isinstance(layout, layout_lib.Layout):
    raise ValueError(f"layout must be a sja.Layout, got {type(layout).__name__}")
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  if (layout.q_len, layout.kv_len, layout.num_heads) != (q_len, kv_len, heads):
    raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}, "
                     f"heads={layout.num_heads}; q and k have {q_len=}, {kv_len=}, {heads=}")
  if layout.head_row.shape[0] not in (1, batch):
    raise ValueError(f"layout has rows for batch {layout.head_row.shape[0]}, q has {batch=}")
  visible = (np.ones((1, q_len, kv_len), bool) if mask is None
             else _mask_table(mask, heads, (q_len, kv_len)))
  p = _probs(q, k, visible[None], sm_scale)
  covered = layout_lib.dense_mask(layout)[block_lists.head_rows(layout, batch)]
  total = p.sum(-1)
  has_mass = total > 0
  rows = jnp.where(has_mass, jnp.where(covered, p, 0.0).sum(-1) / jnp.where(has_mass, total, 1),
                   0.0)
  count = has_mass.sum(-1)
  return jnp.where(count > 0, rows.sum(-1) / jnp.maximum(count, 1), 1.0)
