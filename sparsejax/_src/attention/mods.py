"""What every attention implementation applies to the scores besides the layout.

Segment ids (packed documents), a traced `score_mod` and per-head sink
logits. `Mods` carries them from the public API to the implementations;
`trace` turns a `score_mod` into a function of explicit arrays, so a Pallas
kernel receives the arrays it captures as inputs and a `custom_vjp` can
return their gradients.

Conventions shared by every implementation:

* scores are ``q . k * sm_scale`` in float32; `score_mod` sees them before
  masking, and masked entries stay at -inf whatever it returns;
* a sink logit joins the softmax denominator of every query row of its head
  (``exp(sink) + sum_j exp(s_j)``) and has no value: rows with no visible
  key get 0, and the log-sum-exp includes the sink.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src.attention import block_lists

ScoreMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Mods:
  """Score modifiers handed to an implementation (not a pytree: `score_mod` is static).

  Attributes:
    score_mod: ``(score, batch, head, q_idx, kv_idx) -> score`` or None.
    sinks: float32[heads] sink logits, or None.
    q_segment_ids: int32[batch, q_len], or None (then kv_segment_ids is None).
    kv_segment_ids: int32[batch, kv_len], or None.
    max_pairs: static bound on the active block pairs of any layout row, or
      None if unknown (segment-derived layouts keep their base's bound).
  """

  score_mod: ScoreMod | None = None
  sinks: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  max_pairs: int | None = None

  @property
  def segments(self) -> bool:
    return self.q_segment_ids is not None

  @property
  def empty(self) -> bool:
    """No segment ids, score_mod or sinks: plain attention over the layout."""
    return self.score_mod is None and self.sinks is None and not self.segments


NONE = Mods()


def trace(score_mod: ScoreMod, score: jax.ShapeDtypeStruct, batch, head, q_idx, kv_idx):
  """`score_mod` as a function of explicit arrays, for the given argument shapes.

  Args:
    score_mod: the user's function.
    score, batch, head, q_idx, kv_idx: `jax.ShapeDtypeStruct`s of the
      arguments as the implementation will pass them (broadcastable shapes).

  Returns:
    (fn, consts): ``fn(score, batch, head, q_idx, kv_idx, *consts)`` computes
    what `score_mod` does, and `consts` are the arrays it captures (traced or
    not), in order. Floating consts are differentiable inputs.
  """
  try:
    closed = jax.make_jaxpr(score_mod)(score, batch, head, q_idx, kv_idx)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f"score_mod(score, batch, head, q_idx, kv_idx) failed when called with "
                     f"score {score.dtype}{list(score.shape)} and int32 indices of shapes "
                     f"{batch.shape}, {head.shape}, {q_idx.shape}, {kv_idx.shape}: {e}") from e
  out = closed.out_avals
  if len(out) != 1 or out[0].shape != score.shape or not jnp.issubdtype(out[0].dtype, jnp.floating):
    raise ValueError(f"score_mod must return one float array shaped like its score "
                     f"{list(score.shape)}, got {[(a.dtype.name, a.shape) for a in out]}")
  jaxpr, consts = closed.jaxpr, tuple(closed.consts)

  def fn(score, batch, head, q_idx, kv_idx, *const_values):
    value, = jax.core.eval_jaxpr(jaxpr, const_values, score, batch, head, q_idx, kv_idx)
    return value.astype(jnp.float32)

  return fn, consts


def is_differentiable(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def const_cotangents(consts, grads):
  """Cotangents for `consts` in a custom_vjp: the gradient, or None for integer arrays."""
  return tuple(g if is_differentiable(c) else None for c, g in zip(consts, grads))


def sink_grad(sinks: jax.Array, lse: jax.Array, delta: jax.Array) -> jax.Array:
  """d loss / d sinks from the log-sum-exp (sink included) and ``delta = sum(out * dout)``.

  Args:
    sinks: float32[heads].
    lse, delta: float32[batch, heads, q_len].
  """
  p_sink = jnp.exp(sinks[None, :, None] - lse)  # the sink's share of each row's softmax
  return -jnp.sum(p_sink * delta, axis=(0, 2))


def const_grads(fn, consts, q, k, v, do, lse, delta, layout, sm_scale, q_segment_ids,
                kv_segment_ids):
  """d loss / d consts of a traced score_mod, over each (batch, head)'s active blocks, in XLA.

  For kernels whose backward computes dq, dk and dv: ``ds = p * (dp - delta)``
  of every active block, pulled back through `fn` to the arrays it captures.

  Args:
    fn, consts: from `trace` at block shapes ``score [block_q, block_kv]``,
      scalar batch and head, ``q_idx [block_q, 1]``, ``kv_idx [1, block_kv]``.
    q, do: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    lse, delta: float32[batch, heads, q_len] (lse with the sink, if any).
    layout: the layout the kernels ran (segment-derived if there are segments).
    sm_scale: softmax scale.
    q_segment_ids, kv_segment_ids: int32[batch, len] or None.

  Returns:
    a tuple like `consts` (zeros for integer consts are never used).
  """
  batch, q_len, heads, dim = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, kv_len // bkv
  count, index, part = block_lists.for_heads(layout, batch)  # [b, h, nq], [b, h, nq, slots]
  slots = index.shape[-1]
  diff = [i for i, c in enumerate(consts) if is_differentiable(c)]
  blocks = lambda x, n, b: x.reshape(n, b, *x.shape[1:])  # noqa: E731

  def one_head(args):
    b, h = args
    qb = blocks(q[b, :, h], nq, bq).astype(jnp.float32)  # [nq, bq, d]
    dob = blocks(do[b, :, h], nq, bq).astype(jnp.float32)
    kb = blocks(k[b, :, h // group], nk, bkv)[index[b, h]].astype(jnp.float32)
    vb = blocks(v[b, :, h // group], nk, bkv)[index[b, h]].astype(jnp.float32)
    s = jnp.einsum("qid,qsjd->qsij", qb, kb) * sm_scale  # [nq, slots, bq, bkv]
    q_idx = (jnp.arange(nq)[:, None, None, None] * bq + jnp.arange(bq)[None, None, :, None])
    kv_idx = index[b, h][..., None, None] * bkv + jnp.arange(bkv)[None, None, None, :]
    visible = (jnp.arange(slots)[None, :] < count[b, h][:, None])[..., None, None]
    pidx = part[b, h][..., None, None]
    visible = visible & jnp.where(pidx >= 0, layout.partial[jnp.maximum(part[b, h], 0)], True)
    if q_segment_ids is not None:
      visible = visible & (q_segment_ids[b][q_idx] == kv_segment_ids[b][kv_idx])

    def modded(*diff_consts):
      values = list(consts)
      for i, c in zip(diff, diff_consts):
        values[i] = c
      block_fn = lambda s, qi, ki: fn(s, b, h, qi, ki, *values)  # noqa: E731
      return jax.vmap(jax.vmap(block_fn, in_axes=(0, None, 0)), in_axes=(0, 0, 0))(
          s, q_idx[:, 0], kv_idx)

    s_mod, pullback = jax.vjp(modded, *[consts[i] for i in diff])
    row_lse = blocks(lse[b, h], nq, bq)[:, None, :, None]
    row_delta = blocks(delta[b, h], nq, bq)[:, None, :, None]
    p = jnp.where(visible, jnp.exp(s_mod - row_lse), 0.0)
    dp = jnp.einsum("qid,qsjd->qsij", dob, vb)
    return pullback(p * (dp - row_delta))

  pairs = (jnp.repeat(jnp.arange(batch), heads), jnp.tile(jnp.arange(heads), batch))
  summed = [g.sum(0) for g in jax.lax.map(one_head, pairs)]
  out = [jnp.zeros_like(c) for c in consts]
  for i, g in zip(diff, summed):
    out[i] = g.astype(jnp.result_type(consts[i]))
  return tuple(out)
