"""The jnp oracle of block-sparse attention, which the tests call.

Dense scores in float32, the score modifier, the layout's element mask and
the segment mask, and a softmax (with the sink logit in its denominator)
that gives a query row with no visible key an output of 0. Takes q [batch,
q_len, heads, head_dim] and k, v [batch, kv_len, kv_heads, head_dim],
kv_heads dividing heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import mods as mods_lib


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                        sm_scale: float, mods: mods_lib.Mods = mods_lib.NONE) -> jax.Array:
  """Dense masked softmax attention (float32 accumulation)."""
  batch, q_len, heads, _ = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  mask = layout_lib.dense_mask(layout)[block_lists.head_rows(layout, batch)]  # [b, h, t, s]
  kf = jnp.repeat(k, group, axis=2).astype(jnp.float32)
  vf = jnp.repeat(v, group, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
  if mods.score_mod is not None:
    index = lambda n, axis: lax.broadcasted_iota(jnp.int32, [n if a == axis else 1  # noqa: E731
                                                             for a in range(4)], axis)
    s = mods.score_mod(s, index(batch, 0), index(heads, 1), index(q_len, 2), index(kv_len, 3))
    s = s.astype(jnp.float32)
  if mods.segments:
    mask = mask & (mods.q_segment_ids[:, None, :, None] == mods.kv_segment_ids[:, None, None, :])
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  if mods.sinks is not None:
    sink = jnp.broadcast_to(mods.sinks[None, :, None, None], m.shape)
    m = jnp.maximum(m, sink)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  if mods.sinks is not None:
    l = l + jnp.exp(sink - m)
  out = jnp.einsum("bhts,bshd->bthd", p / jnp.where(l == 0, 1.0, l), vf)
  return out.astype(q.dtype)
