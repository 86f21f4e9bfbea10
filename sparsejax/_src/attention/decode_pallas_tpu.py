"""Decode attention over a paged KV cache as a Pallas TPU kernel (Mosaic, scalar prefetch).

The page lists (`decode_pallas_pages.page_lists`) are prefetched into SMEM
and drive the index maps, so the grid ``(batch, kv_heads, splits, steps)``
DMAs one page of one KV head per step, straight from the pool: the pool
``[num_pages, page_size, pool_heads, head_dim]`` is viewed, without a copy,
as ``[num_pages * page_size, pool_heads * head_dim]`` and a page of a head
is its ``(page_size, head_dim)`` block. Steps past a split's share re-read
its last page (no DMA) and skip their compute. Each program holds the query
heads of its KV head as one tile (``groups * q_tokens`` rows) and keeps the
online softmax in VMEM scratch over the "arbitrary" page axis; each split
writes a partial output and log-sum-exp that `decode.combine` merges.
Inference only: no VJP. Runs on TPU, and on CPU with ``interpret=True``.

The prefetched lists take ``8 * batch * kv_heads * pages`` bytes of SMEM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparsejax._src import _checks
from sparsejax._src import pallas_common
from sparsejax._src.attention import decode_pallas_pages as pages

_NEG = pallas_common.NEG
_LANES = pallas_common.LANES
_SUBLANES = pallas_common.SUBLANES
_dot = pallas_common.dot


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch settings of the TPU decode kernel (the tiles are the pages).

  Attributes:
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler's default).
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


def _sublanes(dtype) -> int:
  """Rows of a TPU tile of `dtype`: 8 for 32 bits, 16 for 16 bits (packed), 32 for 8."""
  return _SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def _validate_args(k_pool: jax.Array, block_sizes: BlockSizes):
  """The kernel's own constraints; `decode_attention` has checked the cache and the rest."""
  num_pages, page_size, pool_heads, head_dim = k_pool.shape
  tile = _sublanes(k_pool.dtype)
  if page_size % tile and num_pages > 1:
    raise ValueError(f"page_size={page_size} must be a multiple of {tile} for the TPU decode "
                     f"kernel ({k_pool.dtype} tiles); use pages of {tile}, {2 * tile}, ... "
                     f"positions (a contiguous cache: a max_len that is a multiple of {tile})")
  if pool_heads > 1 and head_dim % _LANES:
    raise ValueError(f"head_dim={head_dim} must be a multiple of {_LANES} for the TPU decode "
                     f"kernel when pages hold several KV heads (a 2-d page_table or a contiguous "
                     f"cache); keep pages of one KV head each (a 3-d page_table, as sja.KVCache "
                     f"does) or use implementation=\"xla\"")
  _checks.vmem_limit(block_sizes.vmem_limit_bytes)


def _kernel(lengths_ref, start_ref, stop_ref, phys_ref, logical_ref, head_ref, *refs, sm_scale,
            q_tokens, groups, masks, kv_heads, splits, n):
  del phys_ref, head_ref  # read by the index maps
  ids_ref = refs[0] if len(refs) == 9 else None
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs[-8:]
  b, h, s, j = (pl.program_id(a) for a in range(4))
  program = (b * kv_heads + h) * splits + s
  entry = start_ref[program] + j

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, _NEG, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(entry < stop_ref[program])
  def _step():
    rows, size = q_ref.shape[0], k_ref.shape[0]
    q_pos, group = pages.query_rows(rows, q_tokens, groups * q_tokens, lengths_ref[b])
    mask_id = None if ids_ref is None else pages.row_mask_ids(lambda i: ids_ref[i], h, groups,
                                                               group)
    page = logical_ref[(b * kv_heads + h) * n + entry]
    kv_pos = page * size + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    seen = pages.visible(masks, mask_id, q_pos, kv_pos)
    scores = _dot(q_ref[...], k_ref[...], pallas_common.NT) * sm_scale
    scores = jnp.where(seen, scores, _NEG)
    m_prev = m_scratch[...]  # [rows, lanes], equal across lanes
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.where(seen, jnp.exp(scores - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    pv = _dot(p.astype(v_ref.dtype), v_ref[...], pallas_common.NN)
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scratch[...]
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    o_ref[...] = acc_scratch[...] / safe[:, :1]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_scratch[...] + jnp.log(safe))


@functools.partial(jax.jit, static_argnames=("mask", "sm_scale", "num_splits", "block_sizes",
                                             "interpret"))
def decode(q, k_pool, v_pool, phys, logical, head, lengths, *, mask, sm_scale, num_splits,
           block_sizes, interpret):
  """Decode attention with the Mosaic TPU kernel (inference only: no VJP).

  The arguments and result are `decode_pallas.decode`'s; `block_sizes` holds
  the launch settings, and ``num_splits=None`` is one split (a TPU core runs
  the grid in sequence: splits only help a second core when batch *
  kv_heads is small).
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  _validate_args(k_pool, block_sizes)
  batch, q_tokens, heads, dim = q.shape
  kv_heads, n = phys.shape[1:]
  num_pages, page_size, pool_heads, _ = k_pool.shape
  groups = heads // kv_heads
  tile = _sublanes(q.dtype)
  rows = -(-groups * q_tokens // tile) * tile
  masks, mask_ids = pages.kernel_masks(mask, heads, rows, page_size)
  splits = num_splits or 1
  lists = pages.page_lists(phys, logical, lengths, mask, heads=heads, q_tokens=q_tokens,
                           page_size=page_size, splits=splits)
  steps = -(-n // splits)
  scalars = [lengths, lists.start.reshape(-1), lists.stop.reshape(-1), lists.phys.reshape(-1),
             lists.logical.reshape(-1), head]
  scalars += [] if mask_ids is None else [mask_ids]

  def at_page(b, h, s, j, lengths, start, stop, phys, logical, head, *ids):
    del lengths, logical, ids
    program = (b * kv_heads + h) * splits + s
    entry = jnp.maximum(jnp.minimum(start[program] + j, stop[program] - 1), 0)
    return jnp.maximum(phys[(b * kv_heads + h) * n + entry], 0), head[h]

  at_q = lambda b, h, s, j, *_: (b, h, 0, 0)  # noqa: E731
  at_out = lambda b, h, s, j, *_: (s, b, h, 0, 0)  # noqa: E731
  pool_spec = pl.BlockSpec((page_size, dim), at_page)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, sm_scale=sm_scale, q_tokens=q_tokens, groups=groups,
                        masks=masks, kv_heads=kv_heads, splits=splits, n=n),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars),
          grid=(batch, kv_heads, splits, steps),
          in_specs=[pl.BlockSpec((None, None, rows, dim), at_q), pool_spec, pool_spec],
          out_specs=[pl.BlockSpec((None, None, None, rows, dim), at_out),
                     pl.BlockSpec((None, None, None, rows, _LANES), at_out)],
          scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                          pltpu.VMEM((rows, _LANES), jnp.float32),
                          pltpu.VMEM((rows, dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((splits, batch, kv_heads, rows, dim), jnp.float32),
                 jax.ShapeDtypeStruct((splits, batch, kv_heads, rows, _LANES), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="decode_attention_tpu",
  )(*scalars, pages.query_tile(q, kv_heads, rows),
    k_pool.reshape(num_pages * page_size, pool_heads * dim),
    v_pool.reshape(num_pages * page_size, pool_heads * dim))
  return pages.merge(out, lse[..., 0], q_tokens, heads)
