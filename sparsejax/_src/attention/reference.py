"""The jnp oracle of block-sparse attention, which the tests call.

Dense scores in float32, the layout's element mask, and a softmax that gives
a query row with no visible key an output of 0. Takes q [batch, q_len, heads,
head_dim] and k, v [batch, kv_len, kv_heads, head_dim], kv_heads dividing heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                        sm_scale: float) -> jax.Array:
  """Dense masked softmax attention (float32 accumulation)."""
  batch, _, heads, _ = q.shape
  group = heads // k.shape[2]
  mask = layout_lib.dense_mask(layout)[block_lists.head_rows(layout, batch)]  # [b, h, t, s]
  kf = jnp.repeat(k, group, axis=2).astype(jnp.float32)
  vf = jnp.repeat(v, group, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
  s = jnp.where(mask, s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhts,bshd->bthd", p / jnp.where(l == 0, 1.0, l), vf)
  return out.astype(q.dtype)
