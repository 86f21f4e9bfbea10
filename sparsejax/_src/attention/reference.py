"""Two jnp implementations of block-sparse attention.

`attention_reference` is the obvious-correct oracle: dense scores in float32,
the layout's element mask, a softmax that gives rows with no visible key an
output of 0. `attention_xla` gathers only the active key blocks of each query
block, so its cost follows the layout's density; it runs anywhere XLA does and
is differentiated by JAX. Both take q [batch, q_len, heads, head_dim] and
k, v [batch, kv_len, kv_heads, head_dim] with kv_heads dividing heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.attention import layout as layout_lib


def _rows(layout: layout_lib.Layout, batch: int) -> jax.Array:
  """int32[batch, heads]: the layout row of each (batch, head)."""
  return jnp.broadcast_to(layout.head_row, (batch, layout.num_heads))


def _softmax_out(s: jax.Array, v_like_einsum) -> jax.Array:
  """Masked softmax (scores already -inf where hidden) with empty rows -> 0."""
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  return v_like_einsum(p / jnp.where(l == 0, 1.0, l))


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                        sm_scale: float) -> jax.Array:
  """Dense masked softmax attention (float32 accumulation)."""
  batch, _, heads, _ = q.shape
  group = heads // k.shape[2]
  mask = layout_lib.dense_mask(layout)[_rows(layout, batch)]  # [b, h, t, s]
  kf = jnp.repeat(k, group, axis=2).astype(jnp.float32)
  vf = jnp.repeat(v, group, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
  s = jnp.where(mask, s, -jnp.inf)
  out = _softmax_out(s, lambda p: jnp.einsum("bhts,bshd->bthd", p, vf))
  return out.astype(q.dtype)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                  sm_scale: float) -> jax.Array:
  """Block-sparse attention that computes only the active (query, key) block pairs.

  Each pair's scores are one small matmul; the softmax runs across the pairs
  of a query block with segment reductions, so the work follows the number
  of active pairs, not the longest row. (batch, head) pairs run one after
  another (`lax.map`), which keeps each one's blocks in cache on CPU.
  """
  batch, q_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, k.shape[1] // bkv
  rows = _rows(layout, batch).reshape(-1)  # [b * h]
  qb = q.reshape(batch, nq, bq, heads, dim).transpose(0, 3, 1, 2, 4)  # [b, h, nq, bq, d]
  kb = k.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  vb = v.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)

  def one_head(args):
    b, h, row = args
    pair_q, pair_kv, part = layout.pair_q[row], layout.pair_kv[row], layout.pair_partial[row]
    valid = jnp.arange(pair_q.shape[0]) < layout.num_pairs[row]
    qg, kg, vg = qb[b, h][pair_q], kb[b, h // group][pair_kv], vb[b, h // group][pair_kv]
    s = jnp.einsum("pid,pjd->pij", qg, kg, preferred_element_type=jnp.float32) * sm_scale
    visible = jnp.where((part >= 0)[:, None, None], layout.partial[jnp.maximum(part, 0)], True)
    s = jnp.where(visible & valid[:, None, None], s, -jnp.inf)
    # Softmax over all pairs of a query block: segment max and sums by pair_q.
    segment = lambda op, x: op(x, pair_q, num_segments=nq, indices_are_sorted=True)
    m = segment(jax.ops.segment_max, lax.stop_gradient(jnp.max(s, axis=-1)))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # [nq, bq]
    p = jnp.exp(s - m[pair_q][..., None])
    l = segment(jax.ops.segment_sum, jnp.sum(p, axis=-1))
    pv = jnp.einsum("pij,pjd->pid", p, vg.astype(jnp.float32))
    return segment(jax.ops.segment_sum, pv) / jnp.where(l == 0, 1.0, l)[..., None]

  b_ix = jnp.repeat(jnp.arange(batch), heads)
  h_ix = jnp.tile(jnp.arange(heads), batch)
  o = lax.map(one_head, (b_ix, h_ix, rows))  # [b * h, nq, bq, d]
  o = o.reshape(batch, heads, q_len, dim).transpose(0, 2, 1, 3)
  return o.astype(q.dtype)
