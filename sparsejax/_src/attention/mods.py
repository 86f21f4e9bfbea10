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
