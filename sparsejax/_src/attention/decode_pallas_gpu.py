"""Decode attention over a paged KV cache as a Pallas kernel for GPUs (Triton backend).

Split-KV (flash-decoding): one program per (sequence, KV head, split) holds
the query heads of its KV head as one tile (``groups * q_tokens`` rows,
padded to a power of 2 >= 16) and walks its share of the pages to read
(`decode_pallas_pages.page_lists`) with an online softmax: per page it loads
the pool page's index and position, reads the ``[page_size, head_dim]``
key and value tiles of its KV head straight from the pool, and masks each
score causally and by the row's mask evaluated at the page's positions.
Each split writes a partial output and log-sum-exp; `decode.combine` merges
them. Inference only: no VJP. Runs on Ampere and newer through the Triton
backend; on CPU with ``interpret=True``.
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
_dot = pallas_common.dot

_MIN_TILE = 16  # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch settings of the GPU decode kernel (the tiles are the pages).

  Attributes:
    num_warps: warps per program.
    num_stages: software pipelining stages.
    programs: programs to aim for when choosing num_splits (``batch *
      kv_heads * splits``), enough to fill a large GPU.
    keys_per_split: the fewest key positions a split is given when choosing
      num_splits.
  """

  num_warps: int = 4
  num_stages: int = 2
  programs: int = 256
  keys_per_split: int = 256

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _compiler_params(block_sizes: BlockSizes):
  """The backend choice, in one place: Triton, which runs on Ampere and newer."""
  return pallas_common.triton_params(block_sizes.num_warps, block_sizes.num_stages)


def _validate_args(page_size: int, head_dim: int, block_sizes: BlockSizes):
  """The kernel's own constraints; `decode_attention` has checked the cache and the rest."""
  for name, size, fix in [
      ("page_size", page_size, "use pages of 16, 32, 64 or 128 positions (a contiguous cache: a "
       "max_len that is a multiple of 16)"),
      ("head_dim", head_dim, "pad the heads to 16, 32, 64, 128 or 256 (or use "
       "implementation=\"xla\")")]:
    if size < _MIN_TILE or size & (size - 1):
      raise ValueError(f"{name}={size} must be a power of 2 >= {_MIN_TILE} for the Triton decode "
                       f"kernel; {fix}")
  for name in ("num_warps", "num_stages", "programs", "keys_per_split"):
    value = getattr(block_sizes, name)
    if not _checks.is_int(value) or value < 1:
      raise ValueError(f"{name}={value!r} must be an integer >= 1")


def _splits(batch: int, kv_heads: int, n: int, page_size: int, block_sizes: BlockSizes) -> int:
  """Default num_splits: enough programs to fill the GPU, each with enough keys."""
  want = -(-block_sizes.programs // max(batch * kv_heads, 1))
  return max(1, min(want, n * page_size // block_sizes.keys_per_split))


def _kernel(lengths_ref, start_ref, stop_ref, phys_ref, logical_ref, head_ref, *refs, sm_scale,
            q_tokens, groups, masks):
  ids_ref = refs[0] if len(refs) == 6 else None
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs[-5:]
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[...]  # [rows, head_dim]
  rows, size = q.shape[0], k_ref.shape[1]
  q_pos, group = pages.query_rows(rows, q_tokens, groups * q_tokens, lengths_ref[b])
  mask_id = None if ids_ref is None else pages.row_mask_ids(lambda i: ids_ref[i], h, groups,
                                                             group)
  pool_head = head_ref[h]

  def body(e, carry):
    acc, m, l = carry
    page = phys_ref[b, h, e]
    k = k_ref[page, :, pool_head, :]  # [page_size, head_dim]
    v = v_ref[page, :, pool_head, :]
    kv_pos = logical_ref[b, h, e] * size + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    seen = pages.visible(masks, mask_id, q_pos, kv_pos)
    scores = jnp.where(seen, _dot(q, k, pallas_common.NT) * sm_scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.where(seen, jnp.exp(scores - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = correction * l + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, pallas_common.NN)
    return acc, m_new, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(start_ref[b, h, s], stop_ref[b, h, s], body, init)
  empty = l == 0.0
  safe = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / safe[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe))


@functools.partial(jax.jit, static_argnames=("mask", "sm_scale", "num_splits", "block_sizes",
                                             "interpret"))
def decode(q, k_pool, v_pool, phys, logical, head, lengths, *, mask, sm_scale, num_splits,
           block_sizes, interpret):
  """Decode attention with the Triton kernel (inference only: no VJP).

  The arguments and result are `decode_pallas.decode`'s; `block_sizes` holds
  the launch settings, and ``num_splits=None`` gives enough programs to fill
  a GPU (`BlockSizes.programs`), each with `BlockSizes.keys_per_split` keys
  or more.
  """
  batch, q_tokens, heads, dim = q.shape
  kv_heads, n = phys.shape[1:]
  page_size = k_pool.shape[1]
  _validate_args(page_size, dim, block_sizes)
  groups = heads // kv_heads
  rows = max(_MIN_TILE, 1 << (groups * q_tokens - 1).bit_length())
  masks, mask_ids = pages.kernel_masks(mask, heads, rows, page_size)
  splits = num_splits or _splits(batch, kv_heads, n, page_size, block_sizes)
  lists = pages.page_lists(phys, logical, lengths, mask, heads=heads, q_tokens=q_tokens,
                           page_size=page_size, splits=splits)
  tile = pages.query_tile(q, kv_heads, rows)
  whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, s, n=x.ndim: (0,) * n)  # noqa: E731
  tables = [lengths, lists.start, lists.stop, lists.phys, lists.logical, head]
  tables += [] if mask_ids is None else [mask_ids]
  out, lse = pl.pallas_call(
      functools.partial(_kernel, sm_scale=sm_scale, q_tokens=q_tokens, groups=groups,
                        masks=masks),
      grid=(batch, kv_heads, splits),
      in_specs=[*(whole(x) for x in tables),
                pl.BlockSpec((None, None, rows, dim), lambda b, h, s: (b, h, 0, 0)),
                whole(k_pool), whole(v_pool)],
      out_specs=[pl.BlockSpec((None, None, None, rows, dim), lambda b, h, s: (s, b, h, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((splits, batch, kv_heads, rows, dim), jnp.float32),
                 jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="decode_attention_triton",
  )(*tables, tile, k_pool, v_pool)
  return pages.merge(out, lse, q_tokens, heads)
