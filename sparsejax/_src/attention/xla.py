"""Block-sparse attention in jnp over the active (query block, key block) pairs.

Each pair's scores are one small matmul; the softmax runs across the pairs of
a query block with segment reductions, so the work follows the number of
active pairs, not the longest row. (batch, head) pairs run one after another
(`lax.map`), which keeps each one's blocks in cache on CPU. Runs anywhere XLA
does and is differentiated by JAX (reverse and forward mode).

The pair lists are derived from the layout's lists of key blocks per query
block on each call: for a layout that is a constant of the jit (`make_layout`'s,
closed over), at trace time and exactly; for a traced one (a jit argument,
`topk_layout` inside the jit), padded to q_blocks * max_kv pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax._src import _checks
from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import mods as mods_lib


def _pairs(layout: layout_lib.Layout):
  """The active block pairs of each layout row, in row-major order (grouped by query block).

  Padded like the lists, to the most pairs of any row if the layout is
  concrete, else to q_blocks * max_kv.

  Returns:
    (count int32[rows], pair_q, pair_kv, pair_partial int32[rows, max_pairs]).
  """
  rows, nq, max_kv = layout.kv_index.shape
  if _checks.is_concrete(layout.num_kv):
    size = max(int(np.asarray(layout.num_kv).sum(-1).max()), 1)
  else:
    size = nq * max_kv
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
    layout: a `Layout` for these lengths and heads.
    sm_scale: softmax scale.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; 0 in rows with no visible key.
  """
  if not mods.empty:
    raise NotImplementedError("segment ids, score_mod and sinks: not yet in the xla path")
  batch, q_len, heads, dim = q.shape
  if batch == 0:
    return jnp.zeros(q.shape, q.dtype)
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, k.shape[1] // bkv
  num_pairs, pair_q, pair_kv, pair_partial = _pairs(layout)
  qb = q.reshape(batch, nq, bq, heads, dim).transpose(0, 3, 1, 2, 4)  # [b, h, nq, bq, d]
  kb = k.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  vb = v.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)

  def one_head(args):
    b, h, row = args
    pq, pkv, part = pair_q[row], pair_kv[row], pair_partial[row]
    valid = jnp.arange(pq.shape[0]) < num_pairs[row]
    qg, kg, vg = qb[b, h][pq], kb[b, h // group][pkv], vb[b, h // group][pkv]
    s = jnp.einsum("pid,pjd->pij", qg, kg, preferred_element_type=jnp.float32) * sm_scale
    visible = jnp.where((part >= 0)[:, None, None], layout.partial[jnp.maximum(part, 0)], True)
    s = jnp.where(visible & valid[:, None, None], s, -jnp.inf)
    # Softmax over all pairs of a query block: segment max and sums by pair_q.
    segment = lambda op, x: op(x, pq, num_segments=nq, indices_are_sorted=True)
    m = segment(jax.ops.segment_max, lax.stop_gradient(jnp.max(s, axis=-1)))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # [nq, bq]
    p = jnp.exp(s - m[pq][..., None])
    l = segment(jax.ops.segment_sum, jnp.sum(p, axis=-1))
    pv = jnp.einsum("pij,pjd->pid", p, vg.astype(jnp.float32))
    return segment(jax.ops.segment_sum, pv) / jnp.where(l == 0, 1.0, l)[..., None]

  rows = block_lists.head_rows(layout, batch).reshape(-1)  # [b * h]
  b_ix = jnp.repeat(jnp.arange(batch), heads)
  h_ix = jnp.tile(jnp.arange(heads), batch)
  o = lax.map(one_head, (b_ix, h_ix, rows))  # [b * h, nq, bq, d]
  o = o.reshape(batch, heads, q_len, dim).transpose(0, 2, 1, 3)
  return o.astype(q.dtype)
