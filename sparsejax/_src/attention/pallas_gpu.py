"""Block-sparse flash attention as Pallas kernels for GPUs (Triton backend).

Forward: one program per (query block, batch, head) walks the layout's list
of active key blocks with an online softmax and writes the output and the
log-sum-exp. Backward: a dQ kernel walks the same lists; a dK/dV kernel walks
the transposed lists (query blocks per key block). Each block is computed
under a branch on its kind: full blocks skip masking, partial blocks evaluate
the row's mask at the block's positions when the layout carries masks
computable in a kernel (`Layout.masks`), else load their element mask from
the layout's table. Runs on Ampere and newer through the Triton backend; on
CPU with ``interpret=True``.

Score modifiers (`mods.Mods`) are fused: each program loads its segment ids
and masks elementwise, evaluates the traced `score_mod` on each block of
scores (and its elementwise derivative in the backward kernels), and starts
the online softmax from the head's sink. The arrays a `score_mod` captures
are kernel inputs read through their refs (`kernel_score_mod`): indexing
them by head or by position becomes a load, which Triton can do, where a
gather of a loaded value cannot lower (`_Triton`). The gradients of captured arrays and
of sinks are XLA passes (`mods.const_grads`, `mods.sink_grad`).
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
from sparsejax._src.attention import kernel_score_mod
from sparsejax._src.attention import layout as layout_lib
from sparsejax._src.attention import masks as masks_lib
from sparsejax._src.attention import mods as mods_lib

_NEG = pallas_common.NEG
_dot = pallas_common.dot


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


def _meta(layout: layout_lib.Layout, batch: int, transposed: bool,
          mask_id: jax.Array | None) -> tuple[jax.Array, int]:
  """Per (batch, head, block): [count, index..., partial..., mask id] padded to a power of 2.

  The mask id (`block_lists.masks_for_heads`) is there only if given.
  """
  count, index, part = block_lists.for_heads(layout, batch, transposed=transposed)
  size = index.shape[-1]
  columns = [count[..., None], index, part]  # [b, h, n, 1 + 2 size]
  if mask_id is not None:
    columns.append(jnp.broadcast_to(mask_id[:, :, None, None], count.shape + (1,)))
  meta = jnp.concatenate(columns, axis=-1)
  width = _next_pow2(meta.shape[-1])
  meta = jnp.pad(meta, [(0, 0)] * 3 + [(0, width - meta.shape[-1])])
  return meta, size


def _table_input(layout: layout_lib.Layout, km):
  """([the element-mask table], [its BlockSpec]), or two empty lists if the kernels use masks."""
  if km.masks is not None:
    return [], []
  p = layout.partial.astype(jnp.int32)
  p = jnp.pad(p, [(0, _next_pow2(p.shape[0]) - p.shape[0]), (0, 0), (0, 0)])
  return [p], [pl.BlockSpec(p.shape, lambda i, b, h: (0, 0, 0))]


def _partial_visible(km, partial_ref, meta_ref, size):
  """``(pidx, q_pos, kv_pos) -> bool[bq, bkv]``: a partial block's entries, in a kernel."""
  if km.masks is None:
    return lambda pidx, q_pos, kv_pos: partial_ref[pidx] != 0
  mask_id = meta_ref[1 + 2 * size] if len(km.masks) > 1 else None
  return lambda pidx, q_pos, kv_pos: block_lists.visible(km.masks, mask_id, q_pos, kv_pos)


def _by_kind(pidx, step, carry):
  """``step(masked, carry)`` under a branch: full blocks (pidx -1) skip masking."""
  return lax.cond(pidx >= 0, functools.partial(step, True), functools.partial(step, False),
                  carry)


# score_mod in a kernel: `kernel_score_mod` evaluates its jaxpr with the
# captured arrays left in their refs until an op needs their values. Triton
# loads at array indices but lowers no gather or dynamic slice of a value, so
# `_Triton` turns a gather of single elements from a view into a load at those
# indices, and (compiled kernels, `strict`) refuses with a ValueError at trace
# time what slices or gathers a computed value.

_UNSUPPORTED = ("use implementation='xla', or write score_mod so that it indexes its captured "
                "arrays directly by head and position, e.g. table[h, q_idx - kv_idx + offset]")
_VALUE_INDEXING = frozenset({"gather", "dynamic_slice", "slice", "dynamic_update_slice",
                             "scatter", "scatter-add", "scatter_add", "scatter-mul"})


@dataclasses.dataclass(frozen=True)
class _KernelMods:
  """What the kernels apply besides the layout (static).

  Attributes:
    score_mod: the traced score_mod, or None; the arrays it captures follow
      the segment ids and sinks among the inputs.
    segments: whether segment ids follow q, k, v among the inputs.
    sinks: whether the sink logits follow them.
    strict: refuse, at trace time, what the Triton lowering cannot do.
    masks: the masks partial blocks evaluate (`block_lists.masks_for_heads`),
      or None: the element-mask table follows the block lists instead.
  """

  score_mod: kernel_score_mod.ScoreMod | None
  segments: bool
  sinks: bool
  strict: bool
  masks: tuple[masks_lib.Mask, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Triton(kernel_score_mod.Policy):
  """Triton's reads of captured arrays: a window as a load, a gather as loads of elements."""

  strict: bool

  def read(self, view):
    size = int(np.prod(view.shape))
    if self.strict and size & (size - 1):
      raise ValueError(f"score_mod uses a captured array's window of shape {view.shape} whole; "
                       f"Triton loads only blocks of a power-of-2 size: {_UNSUPPORTED}")
    index = [pl.ds(s, n) if d in view.kept else s
             for d, (s, n) in enumerate(zip(view.start, view.size))]
    return view.ref[tuple(index) or (0,)]  # a scalar's ref holds one element

  def gather(self, view, indices, eqn):
    """A `lax.gather` of single elements, one index per dimension, as a load."""
    params = eqn.params
    dnums, rank = params["dimension_numbers"], len(view.shape)
    if (dnums.offset_dims or dnums.operand_batching_dims
        or tuple(sorted(dnums.collapsed_slice_dims)) != tuple(range(rank))
        or any(n != 1 for n in params["slice_sizes"])):
      if self.strict:
        raise ValueError(f"score_mod gathers slices of a captured array ({dnums}); the Triton "
                         f"kernel loads single elements only: {_UNSUPPORTED}")
      return None
    batch = indices.shape[:-1]
    per_dim = [0] * rank  # a dimension the gather does not index is read at 0
    for k, d in enumerate(dnums.start_index_map):
      per_dim[d] = kernel_score_mod.Parts.column(indices, k)
      if per_dim[d] is None:  # a column of a value: Triton cannot slice it
        if self.strict:
          raise ValueError(f"score_mod gathers with an index array it did not build from the "
                           f"positions it is given; the Triton kernel cannot slice it: "
                           f"{_UNSUPPORTED}")
        per_dim[d] = lax.index_in_dim(kernel_score_mod.value(indices, self), k,
                                      axis=len(indices.shape) - 1, keepdims=False)
    fill = params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    index, inside, it = [], True, iter(per_dim)
    for d, (start, size) in enumerate(zip(view.start, view.size)):
      if d not in view.kept:
        index.append(jnp.broadcast_to(start, batch) if batch else start)
        continue
      i = next(it)
      if fill:
        inside = inside & (i >= 0) & (i < size)
      index.append(jnp.broadcast_to(start + kernel_score_mod.clamp(i, 0, size - 1), batch))
    value = view.ref[tuple(index)]
    if fill:
      value = jnp.where(inside, value, _fill_value(value.dtype, params["fill_value"]))
    return value

  def check(self, eqn):
    if self.strict and eqn.primitive.name in _VALUE_INDEXING:
      raise ValueError(f"score_mod applies {eqn.primitive.name} to a value it computed, which "
                       f"the Triton kernel cannot lower: {_UNSUPPORTED}")


def _fill_value(dtype, fill):
  if fill is not None:
    return jnp.asarray(fill, dtype)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.asarray(jnp.nan, dtype)
  if dtype == jnp.bool_:
    return jnp.asarray(True)
  info = jnp.iinfo(dtype)
  return jnp.asarray(info.min if jnp.issubdtype(dtype, jnp.signedinteger) else info.max, dtype)


def _eval_score_mod(km: _KernelMods, const_refs, b, h):
  """``(score, q_pos, kv_pos) -> score_mod(score, b, h, q_pos, kv_pos)`` in a kernel."""
  if km.score_mod is None:
    return None
  views = [kernel_score_mod.View.whole(ref, aval)
           for ref, aval in zip(const_refs, km.score_mod.avals)]
  policy = _Triton(km.strict)
  return lambda s, q_pos, kv_pos: km.score_mod.apply(policy, views, s, b, h, q_pos, kv_pos)


def _split_table(refs, km: _KernelMods):
  """(the element-mask table's ref or None, the refs after it)."""
  return (None, refs) if km.masks is not None else (refs[0], refs[1:])


def _unpack(refs, km: _KernelMods):
  """The refs after q, k, v: (q ids, kv ids, sinks, captured arrays, outputs); None if absent."""
  refs = list(refs)
  q_ids = kv_ids = sinks = None
  if km.segments:
    q_ids, kv_ids = refs.pop(0), refs.pop(0)
  if km.sinks:
    sinks = refs.pop(0)
  n = 0 if km.score_mod is None else len(km.score_mod.avals)
  return q_ids, kv_ids, sinks, refs[:n], refs[n:]


def _positions(start, size: int, axis: int) -> jax.Array:
  """int32 global positions of a block, as a column (axis 0) or a row (axis 1)."""
  pos = start * size + jnp.arange(size, dtype=jnp.int32)
  return pos[:, None] if axis == 0 else pos[None, :]


def _scores(score_mod, q, k, sm_scale, visible, q_pos, kv_pos, q_ids, kv_ids, derivative=False):
  """One block pair: the scores after score_mod, where they are visible, d score / d raw score.

  `visible` (and the result) is None where every entry is (a full block
  without segment ids). The derivative is None without score_mod or unless
  asked for (backward).
  """
  s = _dot(q, k, pallas_common.NT) * sm_scale
  if q_ids is not None:
    same = q_ids[:, None] == kv_ids[None, :]
    visible = same if visible is None else visible & same
  if score_mod is None:
    return s, visible, None
  modded = lambda s: score_mod(s, q_pos, kv_pos)  # noqa: E731
  if not derivative:
    return modded(s), visible, None
  s, dmod = jax.jvp(modded, (s,), (jnp.ones_like(s),))  # elementwise: the diagonal
  return s, visible, dmod


def _fwd_kernel(meta_ref, *refs, sm_scale, block_kv, size, km):
  partial_ref, (q_ref, k_ref, v_ref, *refs) = _split_table(refs, km)
  q_ids_ref, kv_ids_ref, sinks_ref, const_refs, (o_ref, lse_ref) = _unpack(refs, km)
  partial_visible = _partial_visible(km, partial_ref, meta_ref, size)
  q = q_ref[...]
  block_q, dim = q.shape
  b, h = pl.program_id(1), pl.program_id(2)
  score_mod = _eval_score_mod(km, const_refs, b, h)
  q_pos = _positions(pl.program_id(0), block_q, 0)
  q_ids = None if q_ids_ref is None else q_ids_ref[...]

  def body(j, carry):
    kv, pidx = meta_ref[1 + j], meta_ref[1 + size + j]
    cols = pl.ds(kv * block_kv, block_kv)
    kv_pos = _positions(kv, block_kv, 1)

    def step(masked, carry):
      acc, m, l = carry
      k, v = k_ref[cols, :], v_ref[cols, :]
      s, visible, _ = _scores(score_mod, q, k, sm_scale,
                              partial_visible(pidx, q_pos, kv_pos) if masked else None,
                              q_pos, kv_pos, q_ids,
                              None if kv_ids_ref is None else kv_ids_ref[cols])
      if visible is not None:
        s = jnp.where(visible, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp(s - m_new[:, None])
      if visible is not None:
        p = jnp.where(visible, p, 0.0)
      correction = jnp.exp(m - m_new)
      l = correction * l + jnp.sum(p, axis=1)
      acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, pallas_common.NN)
      return acc, m_new, l

    return _by_kind(pidx, step, carry)

  if sinks_ref is None:
    m0, l0 = jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32)
  else:  # the sink is a key of logit `sink` and value 0: it starts the softmax
    m0, l0 = jnp.full((block_q,), sinks_ref[h], jnp.float32), jnp.ones((block_q,), jnp.float32)
  init = (jnp.zeros((block_q, dim), jnp.float32), m0, l0)
  acc, m, l = lax.fori_loop(0, meta_ref[0], body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _ds(s, visible, dmod, lse, do, v, delta):
  """The probabilities of one block pair and d loss / d raw scores (0 where not visible)."""
  p = jnp.exp(s - lse[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = _dot(do, v, pallas_common.NT)
  ds = p * (dp - delta[:, None])
  if dmod is not None:
    ds = ds * dmod if visible is None else jnp.where(visible, ds * dmod, 0.0)
  return p, ds


def _dq_kernel(meta_ref, *refs, sm_scale, block_kv, size, km):
  partial_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs) = _split_table(refs, km)
  q_ids_ref, kv_ids_ref, _, const_refs, (dq_ref,) = _unpack(refs, km)
  partial_visible = _partial_visible(km, partial_ref, meta_ref, size)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  block_q = q.shape[0]
  score_mod = _eval_score_mod(km, const_refs, pl.program_id(1), pl.program_id(2))
  q_pos = _positions(pl.program_id(0), block_q, 0)
  q_ids = None if q_ids_ref is None else q_ids_ref[...]

  def body(j, dq):
    kv, pidx = meta_ref[1 + j], meta_ref[1 + size + j]
    cols = pl.ds(kv * block_kv, block_kv)
    kv_pos = _positions(kv, block_kv, 1)

    def step(masked, dq):
      k, v = k_ref[cols, :], v_ref[cols, :]
      s, visible, dmod = _scores(score_mod, q, k, sm_scale,
                                 partial_visible(pidx, q_pos, kv_pos) if masked else None,
                                 q_pos, kv_pos, q_ids,
                                 None if kv_ids_ref is None else kv_ids_ref[cols],
                                 derivative=True)
      _, ds = _ds(s, visible, dmod, lse, do, v, delta)
      return dq + _dot(ds.astype(k.dtype), k, pallas_common.NN)

    return _by_kind(pidx, step, dq)

  dq = lax.fori_loop(0, meta_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(meta_ref, *refs, sm_scale, block_q, size, km):
  partial_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs) = _split_table(refs, km)
  q_ids_ref, kv_ids_ref, _, const_refs, (dk_ref, dv_ref) = _unpack(refs, km)
  partial_visible = _partial_visible(km, partial_ref, meta_ref, size)
  k, v = k_ref[...], v_ref[...]
  block_kv = k.shape[0]
  score_mod = _eval_score_mod(km, const_refs, pl.program_id(1), pl.program_id(2))
  kv_pos = _positions(pl.program_id(0), block_kv, 1)
  kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]

  def body(j, carry):
    qb, pidx = meta_ref[1 + j], meta_ref[1 + size + j]
    rows = pl.ds(qb * block_q, block_q)
    q_pos = _positions(qb, block_q, 0)

    def step(masked, carry):
      dk, dv = carry
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse, delta = lse_ref[rows], delta_ref[rows]
      s, visible, dmod = _scores(score_mod, q, k, sm_scale,
                                 partial_visible(pidx, q_pos, kv_pos) if masked else None,
                                 q_pos, kv_pos, None if q_ids_ref is None else q_ids_ref[rows],
                                 kv_ids, derivative=True)
      p, ds = _ds(s, visible, dmod, lse, do, v, delta)
      dv = dv + _dot(p.astype(do.dtype), do, pallas_common.TN)
      dk = dk + _dot(ds.astype(q.dtype), q, pallas_common.TN)
      return dk, dv

    return _by_kind(pidx, step, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, meta_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad_dim(x, dim):
  return jnp.pad(x, [(0, 0)] * 3 + [(0, dim - x.shape[-1])]) if x.shape[-1] != dim else x


def _mod_inputs(km, q_ids, kv_ids, sinks, consts, q_block, kv_block):
  """The kernels' inputs after q, k, v (and their BlockSpecs) over a (block, batch, head) grid.

  q_block / kv_block: the ids block of the grid's own axis, or None for whole rows.
  """
  args, specs = [], []
  if km.segments:
    for ids, block in [(q_ids, q_block), (kv_ids, kv_block)]:
      args.append(ids)
      specs.append(pl.BlockSpec((None, ids.shape[1]), lambda i, b, h: (b, 0)) if block is None
                   else pl.BlockSpec((None, block), lambda i, b, h: (b, i)))
  if km.sinks:
    args.append(sinks)
    specs.append(pl.BlockSpec(sinks.shape, lambda i, b, h: (0,)))
  for c in consts:  # whole, in one block; a scalar as one element
    c = c.reshape(1) if c.ndim == 0 else c
    args.append(c)
    specs.append(pl.BlockSpec(c.shape, lambda i, b, h, n=c.ndim: (0,) * n))
  return args, specs


def _forward(q, k, v, layout, q_ids, kv_ids, sinks, consts, km, sm_scale, block_sizes,
             interpret):
  batch, q_len, heads, dim = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  bq, bkv = layout.block_q, layout.block_kv
  mask_id = block_lists.masks_for_heads(layout, batch)[1]
  meta, size = _meta(layout, batch, False, mask_id)
  table, table_specs = _table_input(layout, km)
  extra, extra_specs = _mod_inputs(km, q_ids, kv_ids, sinks, consts, bq, None)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, sm_scale=sm_scale, block_kv=bkv, size=size, km=km),
      grid=(q_len // bq, batch, heads),
      in_specs=[
          pl.BlockSpec((None, None, None, meta.shape[-1]), lambda i, b, h: (b, h, i, 0)),
          *table_specs,
          pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
          *extra_specs,
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
  )(meta, *table, q, k, v, *extra)
  return out, lse


def _backward(q, k, v, lse, delta, do, layout, q_ids, kv_ids, consts, km, sm_scale,
              block_sizes, interpret):
  batch, q_len, heads, dim = q.shape
  kv_len, group = k.shape[1], heads // k.shape[2]
  bq, bkv = layout.block_q, layout.block_kv
  km = dataclasses.replace(km, sinks=False)  # the sinks are in lse
  table, table_specs = _table_input(layout, km)
  params = None if interpret else _compiler_params(dim, block_sizes)
  mask_id = block_lists.masks_for_heads(layout, batch)[1]
  meta, size = _meta(layout, batch, False, mask_id)
  kv_spec = pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  extra, extra_specs = _mod_inputs(km, q_ids, kv_ids, None, consts, bq, None)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, block_kv=bkv, size=size, km=km),
      grid=(q_len // bq, batch, heads),
      in_specs=[pl.BlockSpec((None, None, None, meta.shape[-1]), lambda i, b, h: (b, h, i, 0)),
                *table_specs, row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec, *extra_specs],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dq",
  )(meta, *table, q, k, v, do, lse, delta, *extra)
  meta_t, size_t = _meta(layout, batch, True, mask_id)
  seq_spec = pl.BlockSpec((None, q_len, None, dim), lambda i, b, h: (b, 0, h, 0))
  seq_stat = pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))
  kv_block = pl.BlockSpec((None, bkv, None, dim), lambda i, b, h: (b, i, h // group, 0))
  out_block = pl.BlockSpec((None, bkv, None, dim), lambda i, b, h: (b, i, h, 0))
  extra, extra_specs = _mod_inputs(km, q_ids, kv_ids, None, consts, None, bkv)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=bq, size=size_t, km=km),
      grid=(kv_len // bkv, batch, heads),
      in_specs=[pl.BlockSpec((None, None, None, meta_t.shape[-1]), lambda i, b, h: (b, h, i, 0)),
                *table_specs, seq_spec, kv_block, kv_block, seq_spec, seq_stat, seq_stat, *extra_specs],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_len, heads, dim), k.dtype)] * 2,
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dkv",
  )(meta_t, *table, q, k, v, do, lse, delta, *extra)
  # Per query head; heads that share a key head add up (GQA / MQA).
  dk = dk.reshape(batch, kv_len, heads // group, group, dim).sum(3)
  dv = dv.reshape(batch, kv_len, heads // group, group, dim).sum(3)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
@functools.partial(jax.jit,
                   static_argnames=("score_mod", "sm_scale", "block_sizes", "interpret"))
def _attention(q, k, v, layout, q_ids, kv_ids, sinks, consts, score_mod, sm_scale, block_sizes,
               interpret):
  """Block-sparse attention with Pallas GPU kernels (Triton backend).

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]
    layout: a `Layout` (`make_layout` or `topk_layout`; `segment_layout` with ids).
    q_ids, kv_ids: int32[batch, q_len], int32[batch, kv_len] segment ids, or None.
    sinks: float32[heads] sink logits, or None.
    consts: the arrays `score_mod` captures (differentiable if floating).
    score_mod: a `kernel_score_mod.ScoreMod` traced at block shapes, or None.
    sm_scale: softmax scale.
    block_sizes: `BlockSizes` launch settings (the tiles are the layout's blocks).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    [batch, q_len, heads, head_dim]
  """
  return _fwd(q, k, v, layout, q_ids, kv_ids, sinks, consts, score_mod, sm_scale, block_sizes,
              interpret)[0]


def _fwd(q, k, v, layout, q_ids, kv_ids, sinks, consts, score_mod, sm_scale, block_sizes,
         interpret):
  _validate_args(layout, block_sizes)
  if q.shape[0] == 0:  # an empty batch launches no programs
    return jnp.zeros_like(q), (q, k, v, layout, q_ids, kv_ids, sinks, consts, None, None)
  km = _KernelMods(score_mod, q_ids is not None, sinks is not None, not interpret,
                   block_lists.masks_for_heads(layout, q.shape[0])[0])
  dim = q.shape[-1]
  padded = max(_next_pow2(dim), 16)
  qp, kp, vp = (_pad_dim(x, padded) for x in (q, k, v))
  out, lse = _forward(qp, kp, vp, layout, q_ids, kv_ids, sinks, consts, km, sm_scale,
                      block_sizes, interpret)
  out = out[..., :dim]
  return out, (q, k, v, layout, q_ids, kv_ids, sinks, consts, out, lse)


def _bwd(score_mod, sm_scale, block_sizes, interpret, residuals, do):
  q, k, v, layout, q_ids, kv_ids, sinks, consts, out, lse = residuals
  if q.shape[0] == 0:
    zeros = [jnp.zeros_like(c) for c in consts]
    return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None, None, None,
            None if sinks is None else jnp.zeros_like(sinks),
            mods_lib.const_cotangents(consts, zeros))
  km = _KernelMods(score_mod, q_ids is not None, sinks is not None, not interpret,
                   block_lists.masks_for_heads(layout, q.shape[0])[0])
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  dim = q.shape[-1]
  padded = max(_next_pow2(dim), 16)
  qp, kp, vp, dop = (_pad_dim(x, padded) for x in (q, k, v, do))
  dq, dk, dv = _backward(qp, kp, vp, lse, delta, dop, layout, q_ids, kv_ids, consts, km,
                         sm_scale, block_sizes, interpret)
  d_sinks = None if sinks is None else mods_lib.sink_grad(sinks, lse, delta)
  d_consts = tuple(None for _ in consts)
  if any(mods_lib.is_differentiable(c) for c in consts):  # XLA drops it if nothing reads it
    grads = mods_lib.const_grads(score_mod.fn, consts, q, k, v, do, lse, delta, layout, sm_scale,
                                 q_ids, kv_ids)
    d_consts = mods_lib.const_cotangents(consts, grads)
  return (dq[..., :dim], dk[..., :dim], dv[..., :dim], None, None, None, d_sinks, d_consts)


_attention.defvjp(_fwd, _bwd)


def block_sparse_attention(q, k, v, layout, sm_scale, block_sizes, interpret,
                           mods: mods_lib.Mods = mods_lib.NONE):
  """The public entry (see `_attention`); `mods` as in `mods.Mods`.

  A `score_mod` is traced here, at the kernels' block shapes, into a function
  of the arrays it captures, which become inputs of the kernels and get
  gradients.
  """
  score_mod, consts = None, ()
  if mods.score_mod is not None:
    score_mod, consts = kernel_score_mod.ScoreMod.trace(mods.score_mod, layout.block_q,
                                                        layout.block_kv)
  return _attention(q, k, v, layout, mods.q_segment_ids, mods.kv_segment_ids, mods.sinks, consts,
                    score_mod, sm_scale, block_sizes, interpret)
