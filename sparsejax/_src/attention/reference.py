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
  """Block-sparse attention that computes only the active key blocks."""
  batch, q_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, k.shape[1] // bkv
  rows = _rows(layout, batch)  # [b, h]
  index = layout.kv_index[rows]  # [b, h, nq, max_kv]
  part = layout.kv_partial[rows]
  valid = jnp.broadcast_to(jnp.arange(index.shape[-1]), index.shape) < (
      layout.num_kv[rows][..., None])
  # Key and value blocks [b, kv_heads, nk, bkv, d], gathered per query block.
  kb = k.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  vb = v.reshape(batch, nk, bkv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  b_ix = jnp.arange(batch)[:, None, None, None]
  h_ix = (jnp.arange(heads) // group)[None, :, None, None]
  kg, vg = kb[b_ix, h_ix, index], vb[b_ix, h_ix, index]  # [b, h, nq, max_kv, bkv, d]
  qb = q.reshape(batch, nq, bq, heads, dim).transpose(0, 3, 1, 2, 4)  # [b, h, nq, bq, d]
  s = jnp.einsum("bhqid,bhqjkd->bhqijk", qb, kg,
                 preferred_element_type=jnp.float32) * sm_scale
  visible = jnp.where((part >= 0)[..., None, None], layout.partial[jnp.maximum(part, 0)], True)
  visible = visible & valid[..., None, None]  # [b, h, nq, max_kv, bq, bkv]
  s = jnp.where(visible.transpose(0, 1, 2, 4, 3, 5), s, -jnp.inf)
  shape = s.shape
  s = s.reshape(shape[:4] + (-1,))
  out = _softmax_out(s, lambda p: jnp.einsum(
      "bhqijk,bhqjkd->bhqid", p.reshape(shape), vg.astype(jnp.float32)))
  return out.transpose(0, 2, 3, 1, 4).reshape(batch, q_len, heads, dim).astype(q.dtype)
