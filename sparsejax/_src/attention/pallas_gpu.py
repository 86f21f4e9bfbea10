"""Block-sparse flash attention as Pallas kernels for GPUs (Triton backend).

Forward: one program per (query block, batch, head) walks the layout's list
of active key blocks with an online softmax and writes the output and the
log-sum-exp. Backward: a dQ kernel walks the same lists; a dK/dV kernel walks
the transposed lists (query blocks per key block). Partial blocks load their
element mask from the layout. Runs on Ampere and newer through the Triton
backend; on CPU with ``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import pallas_common
from sparsejax._src.attention import block_lists
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import mods as mods_lib

_NEG = -0.7 * float(np.finfo(np.float32).max)


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch settings of the GPU kernels (the tiles are the layout's blocks).

  Attributes:
    num_warps: warps per program (None: 4 for head_dim <= 64, else 8).
    num_stages: software pipelining stages.
  """

  num_warps: int | None = None
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _compiler_params(head_dim: int, block_sizes: BlockSizes):
  """The backend choice, in one place: Triton, which runs on Ampere and newer."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  warps = block_sizes.num_warps or (4 if head_dim <= 64 else 8)
  return pl_triton.CompilerParams(num_warps=warps, num_stages=block_sizes.num_stages)


def _validate_args(layout: layout_lib.Layout, block_sizes: BlockSizes):
  """The kernels' own constraints; the public API has checked q, k, v and the layout."""
  for name, size in [("block_q", layout.block_q), ("block_kv", layout.block_kv)]:
    if size < 16 or size & (size - 1):
      raise ValueError(f"layout.{name}={size} must be a power of 2 >= 16 for the GPU kernel; "
                       f"make the layout with {name}=16, 32, 64 or 128")
  warps, stages = block_sizes.num_warps, block_sizes.num_stages
  if warps is not None and (not _checks.is_int(warps) or warps < 1 or warps & (warps - 1)):
    raise ValueError(f"num_warps={warps!r} must be a power of 2 >= 1 or None")
  if not _checks.is_int(stages) or stages < 1:
    raise ValueError(f"num_stages={stages!r} must be an integer >= 1")


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _meta(layout: layout_lib.Layout, batch: int, transposed: bool) -> tuple[jax.Array, int]:
  """Per (batch, head, block): [count, index..., partial...] padded to a power of 2."""
  count, index, part = block_lists.for_heads(layout, batch, transposed=transposed)
  size = index.shape[-1]
  meta = jnp.concatenate([count[..., None], index, part], axis=-1)  # [b, h, n, 1 + 2 size]
  width = _next_pow2(meta.shape[-1])
  meta = jnp.pad(meta, [(0, 0)] * 3 + [(0, width - meta.shape[-1])])
  return meta, size


def _partial_table(layout: layout_lib.Layout) -> jax.Array:
  p = layout.partial.astype(jnp.int32)
  return jnp.pad(p, [(0, _next_pow2(p.shape[0]) - p.shape[0]), (0, 0), (0, 0)])


def _visible(partial_ref, pidx):
  return jnp.where(pidx >= 0, partial_ref[jnp.maximum(pidx, 0)] != 0, True)


def _fwd_kernel(meta_ref, partial_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale,
                block_kv, size):
  q = q_ref[...]
  block_q, dim = q.shape

  def body(j, carry):
    acc, m, l = carry
    kv = meta_ref[1 + j]
    visible = _visible(partial_ref, meta_ref[1 + size + j])
    k = k_ref[pl.ds(kv * block_kv, block_kv), :]
    v = v_ref[pl.ds(kv * block_kv, block_kv), :]
    s = _dot(q, k, pallas_common.NT) * sm_scale
    s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = correction * l + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, pallas_common.NN)
    return acc, m_new, l

  init = (jnp.zeros((block_q, dim), jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, meta_ref[0], body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(meta_ref, partial_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, sm_scale, block_kv, size):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    kv = meta_ref[1 + j]
    visible = _visible(partial_ref, meta_ref[1 + size + j])
    k = k_ref[pl.ds(kv * block_kv, block_kv), :]
    v = v_ref[pl.ds(kv * block_kv, block_kv), :]
    s = _dot(q, k, pallas_common.NT) * sm_scale
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, v, pallas_common.NT)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, pallas_common.NN)

  dq = lax.fori_loop(0, meta_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(meta_ref, partial_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, sm_scale, block_q, size):
  k, v = k_ref[...], v_ref[...]

  def body(j, carry):
    dk, dv = carry
    qb = meta_ref[1 + j]
    visible = _visible(partial_ref, meta_ref[1 + size + j])
    rows = pl.ds(qb * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    lse, delta = lse_ref[rows], delta_ref[rows]
    s = _dot(q, k, pallas_common.NT) * sm_scale
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, pallas_common.TN)
    dp = _dot(do, v, pallas_common.NT)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, pallas_common.TN)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, meta_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad_dim(x, dim):
  return jnp.pad(x, [(0, 0)] * 3 + [(0, dim - x.shape[-1])]) if x.shape[-1] != dim else x


def _forward(q, k, v, layout, sm_scale, block_sizes, interpret):
  batch, q_len, heads, dim = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  bq, bkv = layout.block_q, layout.block_kv
  meta, size = _meta(layout, batch, transposed=False)
  partial = _partial_table(layout)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, sm_scale=sm_scale, block_kv=bkv, size=size),
      grid=(q_len // bq, batch, heads),
      in_specs=[
          pl.BlockSpec((None, None, None, meta.shape[-1]), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec(partial.shape, lambda i, b, h: (0, 0, 0)),
          pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(dim, block_sizes),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(meta, partial, q, k, v)
  return out, lse


def _backward(q, k, v, out, lse, do, layout, sm_scale, block_sizes, interpret):
  batch, q_len, heads, dim = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  bq, bkv = layout.block_q, layout.block_kv
  partial = _partial_table(layout)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  params = None if interpret else _compiler_params(dim, block_sizes)
  meta, size = _meta(layout, batch, transposed=False)
  kv_spec = pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, block_kv=bkv, size=size),
      grid=(q_len // bq, batch, heads),
      in_specs=[pl.BlockSpec((None, None, None, meta.shape[-1]), lambda i, b, h: (b, h, i, 0)),
                pl.BlockSpec(partial.shape, lambda i, b, h: (0, 0, 0)),
                row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dq",
  )(meta, partial, q, k, v, do, lse, delta)
  meta_t, size_t = _meta(layout, batch, transposed=True)
  seq_spec = pl.BlockSpec((None, q_len, None, dim), lambda i, b, h: (b, 0, h, 0))
  seq_stat = pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))
  kv_block = pl.BlockSpec((None, bkv, None, dim), lambda i, b, h: (b, i, h // group, 0))
  out_block = pl.BlockSpec((None, bkv, None, dim), lambda i, b, h: (b, i, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=bq, size=size_t),
      grid=(kv_len // bkv, batch, heads),
      in_specs=[pl.BlockSpec((None, None, None, meta_t.shape[-1]), lambda i, b, h: (b, h, i, 0)),
                pl.BlockSpec(partial.shape, lambda i, b, h: (0, 0, 0)),
                seq_spec, kv_block, kv_block, seq_spec, seq_stat, seq_stat],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_len, heads, dim), k.dtype)] * 2,
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dkv",
  )(meta_t, partial, q, k, v, do, lse, delta)
  # Per query head; heads that share a key head add up (GQA / MQA).
  dk = dk.reshape(batch, kv_len, heads // group, group, dim).sum(3)
  dv = dv.reshape(batch, kv_len, heads // group, group, dim).sum(3)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def _attention(q, k, v, layout, sm_scale, block_sizes, interpret):
  """Block-sparse attention with Pallas GPU kernels (Triton backend).

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]
    layout: a `Layout` (`make_layout` or `topk_layout`).
    sm_scale: softmax scale.
    block_sizes: `BlockSizes` launch settings (the tiles are the layout's blocks).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    [batch, q_len, heads, head_dim]
  """
  return _fwd(q, k, v, layout, sm_scale, block_sizes, interpret)[0]


def _fwd(q, k, v, layout, sm_scale, block_sizes, interpret):
  _validate_args(layout, block_sizes)
  if q.shape[0] == 0:  # an empty batch launches no programs
    return jnp.zeros_like(q), (q, k, v, layout, None, None)
  dim = q.shape[-1]
  padded = max(_next_pow2(dim), 16)
  qp, kp, vp = (_pad_dim(x, padded) for x in (q, k, v))
  out, lse = _forward(qp, kp, vp, layout, sm_scale, block_sizes, interpret)
  return out[..., :dim], (q, k, v, layout, out[..., :dim], lse)


def _bwd(sm_scale, block_sizes, interpret, residuals, do):
  q, k, v, layout, out, lse = residuals
  if q.shape[0] == 0:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None
  dim = q.shape[-1]
  padded = max(_next_pow2(dim), 16)
  qp, kp, vp, op, dop = (_pad_dim(x, padded) for x in (q, k, v, out, do))
  dq, dk, dv = _backward(qp, kp, vp, op, lse, dop, layout, sm_scale, block_sizes, interpret)
  return dq[..., :dim], dk[..., :dim], dv[..., :dim], None


_attention.defvjp(_fwd, _bwd)


def block_sparse_attention(q, k, v, layout, sm_scale, block_sizes, interpret,
                           mods: mods_lib.Mods = mods_lib.NONE):
  """The public entry (see `_attention`); `mods` as in `mods.Mods`."""
  if not mods.empty:
    raise NotImplementedError("segment ids, score_mod and sinks: not yet in this kernel")
  return _attention(q, k, v, layout, sm_scale, block_sizes, interpret)

