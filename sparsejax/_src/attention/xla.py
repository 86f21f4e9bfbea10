"""Block-sparse attention in jnp over the active (query block, key block) pairs.

Each pair's scores are one small matmul; the softmax runs across the pairs of
a query block with segment reductions, so the work follows the number of
active pairs, not the longest row. (batch, head) pairs run one after another
(`lax.map`), which keeps each one's blocks in cache on CPU. Segment ids,
`score_mod` and sinks follow `mods`' conventions. Runs anywhere XLA does and
is differentiated by JAX (reverse and forward mode, `score_mod`'s captured
arrays and the sinks included).

The pair lists are derived from the layout's lists of key blocks per query
block on each call: for a layout that is a constant of the jit (`make_layout`'s,
closed over), at trace time and exactly; for a traced one (a jit argument,
`topk_layout` inside the jit), padded to `Mods.max_pairs` when the API knows
that bound (a segment-derived layout keeps its base's), else to
q_blocks * max_kv. Every list is then rounded up to whole chunks (below). A
traced layout's pairs run in up to 16 chunks, and a chunk past the row's
count is skipped (`lax.cond`): with segment ids, the work follows the blocks
where documents meet, not the base layout's bound. (Under `jax.vmap` of the
call the cond becomes a select and every chunk runs.)

Memory: a pair holds its gathered query, key and value blocks and its scores.
When the pairs of a (batch, head) would hold more elements than a dense score
matrix (q_len * kv_len, and at least `_MIN_CHUNK` so that short sequences run
in one piece), they run in chunks of consecutive pairs under `lax.scan`, with
an online softmax (running max, sum and output per query row) carried from
chunk to chunk and each chunk rematerialized in the backward pass
(`jax.checkpoint`: what is saved is the carry of each chunk, chunks * q_len *
(head_dim + 2) floats). So however small the blocks, the temporaries stay
within those of dense attention (causal, 16x16 blocks, T=16,384: under half
of `jax.nn.dot_product_attention`'s, forward and backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src import _checks
from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import mods as mods_lib

_MIN_CHUNK = 1 << 20  # elements (4 MiB of float32) a chunk may always hold
_TRACED_CHUNKS = 16  # chunks of a traced layout's pairs, the ones past its count skipped


def _num_pairs(layout: layout_lib.Layout, max_pairs: int | None) -> int:
  """The static length of the pair lists: exact if the layout is concrete, else a bound."""
  nq, max_kv = layout.kv_index.shape[1:]
  exact = layout_lib.max_pairs(layout)
  if exact is not None:
    return exact
  if max_pairs is not None:
    return max(min(max_pairs, nq * max_kv), 1)
  return nq * max_kv


def _chunking(num_pairs: int, block_q: int, block_kv: int, dim: int, q_len: int,
              kv_len: int, traced: bool = False) -> tuple[int, int]:
  """(chunks, pairs per chunk): chunks holding at most max(q_len * kv_len, _MIN_CHUNK) elements.

  A traced layout's pairs also run in chunks of at most `_TRACED_CHUNKS`-th of
  the bound, so that the chunks past a row's count can be skipped.
  """
  per_pair = block_q * block_kv + (block_q + 2 * block_kv) * dim  # scores, q, k and v blocks
  budget = max(q_len * kv_len, _MIN_CHUNK)
  chunks = max(-(-num_pairs * per_pair // budget), 1)
  if traced:
    chunks = max(chunks, min(_TRACED_CHUNKS, num_pairs))
  return chunks, -(-num_pairs // chunks)


def _pairs(layout: layout_lib.Layout, size: int):
  """The active block pairs of each layout row, in row-major order (grouped by query block).

  Padded to `size` (at least the most pairs of any row) by repeating the last.

  Returns:
    (count int32[rows], pair_q, pair_kv, pair_partial int32[rows, size]).
  """
  rows, _, max_kv = layout.kv_index.shape
  with jax.ensure_compile_time_eval():
    valid = jnp.arange(max_kv)[None, None, :] < layout.num_kv[..., None]
    count, flat, partial = layout_lib.active_lists(
        valid.reshape(rows, -1), layout.kv_partial.reshape(rows, -1), size)
    pair_kv = jnp.take_along_axis(layout.kv_index.reshape(rows, -1), flat, axis=-1)
    return count, flat // max_kv, pair_kv, partial


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                  sm_scale: float, mods: mods_lib.Mods = mods_lib.NONE) -> jax.Array:
  """Block-sparse attention that computes only the active (query, key) block pairs.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim], kv_heads dividing heads.
    layout: a `Layout` for these lengths and heads (segment-derived if
      `mods` has segment ids).
    sm_scale: softmax scale.
    mods: segment ids, `score_mod` and sinks; `max_pairs` sizes the pair
      lists of a traced layout.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; 0 in rows with no visible
    key (a sink has no value).
  """
  batch, q_len, heads, dim = q.shape
  if batch == 0:
    return jnp.zeros(q.shape, q.dtype)
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, kv_len // bkv
  traced = not _checks.is_concrete(layout.num_kv)
  chunks, per_chunk = _chunking(_num_pairs(layout, mods.max_pairs), bq, bkv, dim, q_len, kv_len,
                                traced)
  num_pairs, pair_q, pair_kv, pair_partial = _pairs(layout, chunks * per_chunk)
  qb = q.reshape(batch, nq, bq, heads, dim).transpose(0, 3, 1, 2, 4)  # [b, h, nq, bq, d]
  kb = k.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  vb = v.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)

  def one_head(args):
    b, h, row = args
    q_h, k_h, v_h = qb[b, h], kb[b, h // group], vb[b, h // group]
    segment = lambda op, x, pq: op(x, pq, num_segments=nq, indices_are_sorted=True)  # noqa: E731

    def step(carry, chunk):
      """Online softmax over one chunk of pairs: running max, sum and output per query row."""
      m_run, l_run, o_run = carry  # [nq, bq], [nq, bq], [nq, bq, d]
      pq, pkv, part, valid = chunk  # [pairs] each
      s = jnp.einsum("pid,pjd->pij", q_h[pq], k_h[pkv],
                     preferred_element_type=jnp.float32) * sm_scale
      q_idx = pq[:, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None]
      kv_idx = pkv[:, None, None] * bkv + jnp.arange(bkv, dtype=jnp.int32)[None, None, :]
      if mods.score_mod is not None:
        s = mods.score_mod(s, b, h, q_idx, kv_idx).astype(jnp.float32)
      visible = jnp.where((part >= 0)[:, None, None], layout.partial[jnp.maximum(part, 0)], True)
      visible = visible & valid[:, None, None]
      if mods.segments:
        visible = visible & (mods.q_segment_ids[b][q_idx] == mods.kv_segment_ids[b][kv_idx])
      s = jnp.where(visible, s, -jnp.inf)
      m_chunk = segment(jax.ops.segment_max, lax.stop_gradient(jnp.max(s, axis=-1)), pq)
      m_new = jnp.maximum(m_run, m_chunk)
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      alpha = jnp.exp(m_run - m_safe)  # 0 where nothing was seen yet
      p = jnp.exp(s - m_safe[pq][..., None])
      l_new = l_run * alpha + segment(jax.ops.segment_sum, jnp.sum(p, axis=-1), pq)
      pv = jnp.einsum("pij,pjd->pid", p, v_h[pkv].astype(jnp.float32))
      o_new = o_run * alpha[..., None] + segment(jax.ops.segment_sum, pv, pq)
      return (m_new, l_new, o_new), None

    if mods.sinks is None:
      m0, l0 = jnp.full((nq, bq), -jnp.inf), jnp.zeros((nq, bq))
    else:  # the sink starts each row: its logit is the first max, exp(sink - max) the first sum
      sink = mods.sinks[h]
      m0 = jnp.full((nq, bq), lax.stop_gradient(sink))
      l0 = jnp.broadcast_to(jnp.exp(sink - lax.stop_gradient(sink)), (nq, bq))
    slot = jnp.arange(chunks * per_chunk)
    pairs = (pair_q[row], pair_kv[row], pair_partial[row], slot < num_pairs[row])
    init = (m0, l0, jnp.zeros((nq, bq, dim)))
    if chunks == 1:
      (_, l, o), _ = step(init, pairs)
    else:
      pairs = tuple(x.reshape(chunks, per_chunk) for x in pairs)
      body = step
      if traced:  # active pairs come first: a chunk whose first pair is padding is all padding
        body = lambda carry, chunk: lax.cond(  # noqa: E731
            chunk[3][0], step, lambda c, _: (c, None), carry, chunk)
      (_, l, o), _ = lax.scan(jax.checkpoint(body), init, pairs)
    return o / jnp.where(l == 0, 1.0, l)[..., None]

  rows = block_lists.head_rows(layout, batch).reshape(-1)  # [b * h]
  b_ix = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), heads)
  h_ix = jnp.tile(jnp.arange(heads, dtype=jnp.int32), batch)
  o = lax.map(one_head, (b_ix, h_ix, rows))  # [b * h, nq, bq, d]
  o = o.reshape(batch, heads, q_len, dim).transpose(0, 2, 1, 3)
  return o.astype(q.dtype)
