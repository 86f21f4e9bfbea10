"""`block_sparse_attention`: one API, four implementations that agree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import mods as mods_lib
from sparsejax._src.attention import pallas_gpu
from sparsejax._src.attention import pallas_tpu
from sparsejax._src.attention import reference
from sparsejax._src.attention import segments
from sparsejax._src.attention import xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check(q, k, v, layout):
  if not isinstance(layout, layout_lib.Layout):
    raise ValueError(f"layout must be a sja.Layout (make_layout or topk_layout), got "
                     f"{type(layout).__name__}")
  if not all(hasattr(a, "ndim") and hasattr(a, "dtype") for a in (q, k, v)):
    raise ValueError(f"q, k and v must be arrays, got {type(q).__name__}, {type(k).__name__}, "
                     f"{type(v).__name__}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k and v must be [batch, seq, heads, head_dim], got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}")
  batch, q_len, heads, dim = q.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
    raise ValueError(f"k and v must both be [{batch}, kv_len, kv_heads, {dim}], got "
                     f"{k.shape=} and {v.shape=}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
    raise ValueError(f"q, k and v must share one of float32, bfloat16, float16, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if dim < 1 or k.shape[2] < 1:
    raise ValueError(f"head_dim and kv_heads must be >= 1, got {q.shape=} and {k.shape=}")
  if heads % k.shape[2]:
    raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({k.shape[2]})")
  if (q_len, k.shape[1], heads) != (layout.q_len, layout.kv_len, layout.num_heads):
    raise ValueError(f"the layout is for q_len={layout.q_len}, kv_len={layout.kv_len}, "
                     f"heads={layout.num_heads}; got q_len={q_len}, kv_len={k.shape[1]}, "
                     f"heads={heads}")
  if layout.head_row.shape[0] not in (1, batch):
    raise ValueError(f"the layout has rows for batch {layout.head_row.shape[0]}, got batch {batch}")


def default_implementation(layout: layout_lib.Layout) -> str:
  """The fastest implementation for the default backend and this layout."""
  backend = jax.default_backend()
  if backend == "gpu":
    return "pallas_triton"
  if backend == "tpu" and layout.block_q % 128 == 0 and layout.block_kv % 128 == 0:
    return "pallas_tpu"
  return "xla"


def _check_mods(q, score_mod, sinks):
  if score_mod is not None and not callable(score_mod):
    raise ValueError(f"score_mod must be a function (score, batch, head, q_idx, kv_idx) -> "
                     f"score, got {type(score_mod).__name__}")
  if score_mod is not None:  # the shapes a kernel passes: a block of scores, scalar ids
    arg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    mods_lib.trace(score_mod, jax.ShapeDtypeStruct((2, 2), jnp.float32), arg(), arg(),
                   arg(2, 1), arg(1, 2))
  if sinks is None:
    return None
  heads = q.shape[2]
  if (not hasattr(sinks, "shape") or tuple(sinks.shape) != (heads,)
      or not jnp.issubdtype(sinks.dtype, jnp.floating)):
    raise ValueError(f"sinks must be a float array of shape (heads,) = ({heads},), got "
                     f"{getattr(sinks, 'dtype', type(sinks).__name__)}"
                     f"{list(getattr(sinks, 'shape', ()))}")
  return jnp.asarray(sinks, jnp.float32)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: layout_lib.Layout,
                           *, q_segment_ids: jax.Array | None = None,
                           kv_segment_ids: jax.Array | None = None,
                           score_mod: mods_lib.ScoreMod | None = None,
                           sinks: jax.Array | None = None,
                           implementation: str | None = None, sm_scale: float | None = None,
                           interpret: bool | None = None) -> jax.Array:
  """Softmax attention restricted to a block-sparse layout.

  Args:
    q: [batch, q_len, heads, head_dim]
    k: [batch, kv_len, kv_heads, head_dim], kv_heads dividing heads (GQA/MQA).
    v: like k.
    layout: from `make_layout` (a mask) or `topk_layout` (content-routed).
    q_segment_ids: int[batch, q_len]: packed documents; query ``i`` sees key
      ``j`` only if ``q_segment_ids[b, i] == kv_segment_ids[b, j]`` (and the
      layout allows it). The layout is narrowed inside jit to the blocks where
      segments meet (`segment_layout`), keeping its list lengths.
    kv_segment_ids: int[batch, kv_len]; default q_segment_ids (q_len == kv_len).
    score_mod: ``score_mod(score, batch, head, q_idx, kv_idx) -> score``, a
      traced elementwise function of the float32 scaled scores and int32
      indices (broadcastable arrays, not scalars), applied before masking in
      every implementation, forward and backward. Arrays it captures get
      gradients (a learned bias table). Write it with jnp ops that index
      captured arrays by the indices it is given, e.g. soft-capping
      ``lambda s, b, h, q, kv: cap * jnp.tanh(s / cap)``, ALiBi
      ``lambda s, b, h, q, kv: s - slopes[h] * (q - kv)``.
    sinks: float[heads]: per-head sink logits that join every row's softmax
      denominator (attention sinks, as in splash attention); differentiable.
    implementation: "reference" (dense masked softmax in float32, the
      oracle), "xla" (jnp over the active blocks only), "pallas" (the Pallas
      kernel of the default backend: "pallas_triton" on GPU and in
      interpret mode on CPU, "pallas_tpu" on TPU), or None for the fastest
      available: Pallas on GPU and TPU, "xla" elsewhere.
    sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.
    interpret: run Pallas kernels in the interpreter; default True on CPU.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. A query row with no visible
    key gets 0 (never NaN), and an empty batch an empty result.

  Differentiable in q, k and v in reverse mode (`jax.grad`, `jax.vjp`) with
  every implementation. Forward mode (`jax.jvp`, `jax.jacfwd`) works with
  "reference" and "xla" only: the Pallas implementations are `jax.custom_vjp`
  functions whose backward pass is hand-written dQ and dK/dV kernels, JAX
  cannot push tangents through a custom VJP, and a forward-mode rule would
  need a kernel of its own. They raise JAX's ``TypeError: can't apply
  forward-mode autodiff (jvp) to a custom_vjp function``; pass
  ``implementation="xla"`` for forward mode.

  Example:
    >>> mask = sja.CausalMask((T, T)) & sja.LocalMask((T, T), window=(256, 0))
    >>> layout = sja.make_layout(mask, num_heads=H, block_q=128, block_kv=128)
    >>> out = sja.block_sparse_attention(q, k, v, layout)
    >>> docs = sja.block_sparse_attention(q, k, v, layout, q_segment_ids=ids)
  """
  _check(q, k, v, layout)
  sinks = _check_mods(q, score_mod, sinks)
  q_ids, kv_ids = segments.check_ids(q_segment_ids, kv_segment_ids, q.shape[0], q.shape[1],
                                     k.shape[1])
  max_pairs = layout_lib.max_pairs(layout)
  if q_ids is not None:
    layout = segments.segment_layout(layout, q_ids, kv_ids)
  mods = mods_lib.Mods(score_mod, sinks, q_ids, kv_ids, max_pairs)
  if implementation is None:
    implementation = default_implementation(layout)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS} or None")
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  else:
    try:
      sm_scale = float(sm_scale)
    except (TypeError, ValueError):
      raise ValueError(f"sm_scale={sm_scale!r} must be a number (or None for "
                       "1 / sqrt(head_dim))") from None
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if implementation == "pallas":
    implementation = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_triton"
  if implementation == "reference":
    return reference.attention_reference(q, k, v, layout, sm_scale, mods)
  if implementation == "xla":
    return xla.attention_xla(q, k, v, layout, sm_scale, mods)
  kernel = pallas_tpu if implementation == "pallas_tpu" else pallas_gpu
  return kernel.block_sparse_attention(q, k, v, layout, sm_scale, kernel.BlockSizes.get_default(),
                                       bool(interpret), mods)
