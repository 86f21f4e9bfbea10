"""Block-sparse flash attention as Pallas TPU kernels (Mosaic, scalar prefetch).

In the style of splash attention: the layout's block lists are prefetched
into SMEM and drive the index maps, so the grid ``(batch, head, block,
slot)`` only ever DMAs active blocks; slots past a row's count re-read the
previous block (padding repeats it) and skip their compute. Forward and dQ
walk the key-block lists; dK/dV walks the transposed query-block lists. q, k
and v are moved to [batch, heads, seq, head_dim] so tiles meet the TPU's
(8, 128) layout. Runs on TPU, and on CPU with ``interpret=True``.
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
_LANES = 128


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch settings of the TPU kernels (the tiles are the layout's blocks).

  Attributes:
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler's
      default); raise it for large blocks or head_dim.
  """

  vmem_limit_bytes: int | None = None

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _compiler_params(block_sizes: BlockSizes):
  """The backend choice, in one place: Mosaic TPU."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=block_sizes.vmem_limit_bytes)


def _validate_args(layout: layout_lib.Layout, block_sizes: BlockSizes):
  """The kernels' own constraints; the public API has checked q, k, v and the layout."""
  for name, size in [("block_q", layout.block_q), ("block_kv", layout.block_kv)]:
    if size % _LANES:
      raise ValueError(f"layout.{name}={size} must be a multiple of {_LANES} for the TPU "
                       f"kernel; make the layout with {name}=128 or a multiple")
  limit = block_sizes.vmem_limit_bytes
  if limit is not None and (not _checks.is_int(limit) or limit < 1):
    raise ValueError(f"vmem_limit_bytes={limit!r} must be an integer >= 1 or None")


def _flat_meta(layout: layout_lib.Layout, batch: int, transposed: bool):
  """Flattened per-(batch, head, block) counts, indices and partial indices for SMEM."""
  count, index, part = block_lists.for_heads(layout, batch, transposed=transposed)
  return count.reshape(-1), index.reshape(-1), part.reshape(-1), index.shape[-1]


def _heads_major(x):
  return jnp.swapaxes(x, 1, 2)  # [b, t, h, d] -> [b, h, t, d]


def _visible(partial_ref, pidx):
  return jnp.where(pidx >= 0, partial_ref[...] != 0, True)


def _fwd_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, partial_ref, o_ref, lse_ref,
                m_scratch, l_scratch, acc_scratch, *, sm_scale, heads, blocks, slots):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, _NEG, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(j < num_ref[row])
  def _step():
    visible = _visible(partial_ref, pid_ref[row * slots + j])
    s = _dot(q_ref[...], k_ref[...], pallas_common.NT)
    s = jnp.where(visible, s * sm_scale, _NEG)
    m_prev = m_scratch[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, lanes]
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    pv = _dot(p.astype(v_ref.dtype), v_ref[...], pallas_common.NN)
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

  @pl.when(j == slots - 1)
  def _finish():
    l = l_scratch[...]
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scratch[...] / safe[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_scratch[...] + jnp.log(safe))


def _dq_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               partial_ref, dq_ref, dq_scratch, *, sm_scale, heads, blocks, slots):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  @pl.when(j < num_ref[row])
  def _step():
    visible = _visible(partial_ref, pid_ref[row * slots + j])
    k = k_ref[...]
    s = _dot(q_ref[...], k, pallas_common.NT) * sm_scale
    lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    dp = _dot(do_ref[...], v_ref[...], pallas_common.NT)
    ds = p * (dp - delta)
    dq_scratch[...] += _dot(ds.astype(k.dtype), k, pallas_common.NN)

  @pl.when(j == slots - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                partial_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, sm_scale, heads, blocks,
                slots):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when(j < num_ref[row])
  def _step():
    visible = _visible(partial_ref, pid_ref[row * slots + j])
    q, do = q_ref[...], do_ref[...]
    s = _dot(q, k_ref[...], pallas_common.NT) * sm_scale
    lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    dv_scratch[...] += _dot(p.astype(do.dtype), do, pallas_common.TN)
    dp = _dot(do, v_ref[...], pallas_common.NT)
    ds = p * (dp - delta)
    dk_scratch[...] += _dot(ds.astype(q.dtype), q, pallas_common.TN)

  @pl.when(j == slots - 1)
  def _finish():
    dk_ref[...] = (dk_scratch[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _forward(q, k, v, layout, sm_scale, block_sizes, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, heads, q_len, dim = q.shape
  group = heads // k.shape[1]
  bq, bkv = layout.block_q, layout.block_kv
  nq = q_len // bq
  num, idx, pid, slots = _flat_meta(layout, batch, transposed=False)
  flat = lambda b, h, i, j: ((b * heads + h) * nq + i) * slots + j
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, nq, slots),
      in_specs=[
          pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j, n, x, p: (b, h, i, 0)),
          pl.BlockSpec((None, None, bkv, dim),
                       lambda b, h, i, j, n, x, p: (b, lax.div(h, group), x[flat(b, h, i, j)], 0)),
          pl.BlockSpec((None, None, bkv, dim),
                       lambda b, h, i, j, n, x, p: (b, lax.div(h, group), x[flat(b, h, i, j)], 0)),
          pl.BlockSpec((None, bq, bkv),
                       lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat(b, h, i, j)], 0), 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j, n, x, p: (b, h, i, 0)),
          pl.BlockSpec((None, None, bq, _LANES), lambda b, h, i, j, n, x, p: (b, h, i, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, dim), jnp.float32)],
  )
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, sm_scale=sm_scale, heads=heads, blocks=nq, slots=slots),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, _LANES), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="block_sparse_attention_fwd_tpu",
  )(num, idx, pid, q, k, v, layout.partial.astype(jnp.int32))
  return out, lse[..., 0]


def _backward(q, k, v, out, lse, do, layout, sm_scale, block_sizes, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, heads, q_len, dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, kv_len // bkv
  delta = jnp.einsum("bhtd,bhtd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  lse_rows, delta_rows = lse[:, :, None, :], delta[:, :, None, :]  # [b, h, 1, t]
  partial = layout.partial.astype(jnp.int32)
  params = None if interpret else _compiler_params(block_sizes)

  num, idx, pid, slots = _flat_meta(layout, batch, transposed=False)
  flat = lambda b, h, i, j: ((b * heads + h) * nq + i) * slots + j
  at_q = lambda b, h, i, j, n, x, p: (b, h, i, 0)
  at_kv = lambda b, h, i, j, n, x, p: (b, lax.div(h, group), x[flat(b, h, i, j)], 0)
  at_row = lambda b, h, i, j, n, x, p: (b, h, 0, i)
  at_partial = lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat(b, h, i, j)], 0), 0, 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, heads=heads, blocks=nq, slots=slots),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, heads, nq, slots),
          in_specs=[pl.BlockSpec((None, None, bq, dim), at_q),
                    pl.BlockSpec((None, None, bkv, dim), at_kv),
                    pl.BlockSpec((None, None, bkv, dim), at_kv),
                    pl.BlockSpec((None, None, bq, dim), at_q),
                    pl.BlockSpec((None, None, 1, bq), at_row),
                    pl.BlockSpec((None, None, 1, bq), at_row),
                    pl.BlockSpec((None, bq, bkv), at_partial)],
          out_specs=pl.BlockSpec((None, None, bq, dim), at_q),
          scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dq_tpu",
  )(num, idx, pid, q, k, v, do, lse_rows, delta_rows, partial)

  num_t, idx_t, pid_t, slots_t = _flat_meta(layout, batch, transposed=True)
  flat_t = lambda b, h, i, j: ((b * heads + h) * nk + i) * slots_t + j
  at_k = lambda b, h, i, j, n, x, p: (b, lax.div(h, group), i, 0)
  at_qt = lambda b, h, i, j, n, x, p: (b, h, x[flat_t(b, h, i, j)], 0)
  at_row_t = lambda b, h, i, j, n, x, p: (b, h, 0, x[flat_t(b, h, i, j)])
  at_partial_t = lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat_t(b, h, i, j)], 0), 0, 0)
  at_out = lambda b, h, i, j, n, x, p: (b, h, i, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, heads=heads, blocks=nk, slots=slots_t),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, heads, nk, slots_t),
          in_specs=[pl.BlockSpec((None, None, bq, dim), at_qt),
                    pl.BlockSpec((None, None, bkv, dim), at_k),
                    pl.BlockSpec((None, None, bkv, dim), at_k),
                    pl.BlockSpec((None, None, bq, dim), at_qt),
                    pl.BlockSpec((None, None, 1, bq), at_row_t),
                    pl.BlockSpec((None, None, 1, bq), at_row_t),
                    pl.BlockSpec((None, bq, bkv), at_partial_t)],
          out_specs=[pl.BlockSpec((None, None, bkv, dim), at_out)] * 2,
          scratch_shapes=[pltpu.VMEM((bkv, dim), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct((batch, heads, kv_len, dim), k.dtype)] * 2,
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dkv_tpu",
  )(num_t, idx_t, pid_t, q, k, v, do, lse_rows, delta_rows, partial)
  # Per query head; heads that share a key head add up (GQA / MQA).
  dk = dk.reshape(batch, kv_heads, group, kv_len, dim).sum(2)
  dv = dv.reshape(batch, kv_heads, group, kv_len, dim).sum(2)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def _attention(q, k, v, layout, sm_scale, block_sizes, interpret):
  """Block-sparse attention with Pallas TPU kernels.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]
    layout: a `Layout` with block sizes that are multiples of 128.
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
  out, lse = _forward(_heads_major(q), _heads_major(k), _heads_major(v), layout, sm_scale,
                      block_sizes, interpret)
  out = _heads_major(out)
  return out, (q, k, v, layout, out, lse)


def _bwd(sm_scale, block_sizes, interpret, residuals, do):
  q, k, v, layout, out, lse = residuals
  if q.shape[0] == 0:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None
  dq, dk, dv = _backward(*(_heads_major(x) for x in (q, k, v, out)), lse, _heads_major(do),
                         layout, sm_scale, block_sizes, interpret)
  return _heads_major(dq), _heads_major(dk), _heads_major(dv), None


_attention.defvjp(_fwd, _bwd)


def block_sparse_attention(q, k, v, layout, sm_scale, block_sizes, interpret,
                           mods: mods_lib.Mods = mods_lib.NONE):
  """The public entry (see `_attention`); `mods` as in `mods.Mods`."""
  if not mods.empty:
    raise NotImplementedError("segment ids, score_mod and sinks: not yet in this kernel")
  return _attention(q, k, v, layout, sm_scale, block_sizes, interpret)
