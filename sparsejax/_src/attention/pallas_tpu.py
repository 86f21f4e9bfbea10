"""Block-sparse flash attention as Pallas TPU kernels (Mosaic, scalar prefetch).

In the style of splash attention: the layout's block lists are prefetched
into SMEM and drive the index maps, so the grid ``(batch, head, block,
slot)`` only ever DMAs active blocks; slots past a row's count re-read the
previous block (padding repeats it) and skip their compute. Forward and dQ
walk the key-block lists; dK/dV walks the transposed query-block lists. q, k
and v are moved to [batch, heads, seq, head_dim] so tiles meet the TPU's
(8, 128) layout. Each step branches on its block's kind: full blocks skip
masking; partial blocks evaluate the row's mask at the block's positions when
the layout carries masks computable in a kernel (`Layout.masks`), else read
their element mask from the layout's table (a DMA per partial block). Runs on
TPU, and on CPU with ``interpret=True``.

Segment ids, a score_mod and sinks (`mods.Mods`) are applied inside the
kernels: query ids come as [batch, q_len, 128] (the id broadcast over lanes)
and key ids as [batch, 8, kv_len] (over sublanes), as splash attention lays
them out; sinks sit in SMEM and start each row's online softmax. A score_mod
is evaluated on each block of scores; the arrays it captures are kernel
inputs, in SMEM when it reads them one entry at a time at scalar indices
(ALiBi's ``slopes[h]``) and whole in VMEM otherwise. Mosaic cannot gather
from an array at vector positions (a relative-position table indexed by
``q_idx - kv_idx``): that raises a ValueError unless ``interpret=True``.
The gradients of captured arrays and of sinks are XLA passes
(`mods.const_grads`, `mods.sink_grad`).
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
_LANES = pallas_common.LANES
_SUBLANES = pallas_common.SUBLANES
_dot = pallas_common.dot


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
  _checks.vmem_limit(block_sizes.vmem_limit_bytes)


def _flat_meta(layout: layout_lib.Layout, batch: int, transposed: bool):
  """Flattened per-(batch, head, block) counts, indices and partial indices for SMEM."""
  count, index, part = block_lists.for_heads(layout, batch, transposed=transposed)
  return count.reshape(-1), index.reshape(-1), part.reshape(-1), index.shape[-1]


def _heads_major(x):
  return jnp.swapaxes(x, 1, 2)  # [b, t, h, d] -> [b, h, t, d]


# score_mod in the kernels (`kernel_score_mod`): captured arrays in SMEM or VMEM.


@dataclasses.dataclass(frozen=True)
class _Mosaic(kernel_score_mod.Policy):
  """Mosaic's reads of the captured arrays kept in SMEM (flat, in 32 bits): one scalar each.

  Attributes:
    strict: refuse the indexing ops Mosaic cannot lower.
    wide: while planning (views' refs are then their arrays' positions):
      per captured array, set where a window of more than one entry is read
      (it goes whole to VMEM); reads give zeros. None in the kernels.
  """

  strict: bool = False
  wide: list[bool] | None = None

  def read(self, view):
    if self.wide is not None:
      self.wide[view.ref] |= int(np.prod(view.shape)) > 1
      return jnp.zeros(view.shape, view.aval.dtype)
    strides = np.cumprod((1,) + view.aval.shape[:0:-1])[::-1]
    flat = sum((s * int(n) for s, n in zip(view.start, strides)), 0)
    entry = view.ref[flat].astype(view.aval.dtype)
    return jnp.broadcast_to(entry, view.shape) if view.shape else entry

  def check(self, eqn):
    if not self.strict:
      return
    name = eqn.primitive.name
    if name == "gather":
      indices, out = eqn.invars[1].aval, eqn.outvars[0].aval
      if (eqn.invars[0].aval.ndim == out.ndim and indices.shape[:-1] == out.shape
          and indices.shape[-1] == 1):
        return  # take_along_axis-like: Mosaic's one gather
    elif name not in ("dynamic_slice", "dynamic_update_slice") and not name.startswith("scatter"):
      return
    operand = eqn.invars[0].aval
    raise ValueError(
        f"score_mod indexes a {operand.dtype}{list(operand.shape)} array with a {name} that "
        f"Mosaic cannot lower on TPU. The pallas_tpu kernels read a captured array one entry "
        f"at a time at scalar indices (batch, head, constants; from SMEM, as for ALiBi's "
        f"slopes[h]), not at q_idx or kv_idx (as for a relative-position table[h, q_idx - "
        f"kv_idx]); write the bias as arithmetic of the indices, or use implementation='xla' "
        f"(or interpret=True)")


@dataclasses.dataclass(frozen=True, eq=False)
class _ScoreMod(kernel_score_mod.ScoreMod):
  """A traced score_mod with its plan (static, hashed by identity).

  Attributes:
    smem: per captured array: True if it is read one entry at a time at
      scalar indices (kept flat in SMEM, in 32 bits: small arrays such as
      per-head parameters), False if whole (VMEM).
  """

  smem: tuple[bool, ...]

  def inputs(self, consts):
    """The captured arrays as kernel inputs, and their BlockSpecs."""
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    arrays, specs = [], []
    for c, smem in zip(consts, self.smem):
      if smem:
        arrays.append(c.reshape(-1).astype(
            jnp.float32 if jnp.issubdtype(c.dtype, jnp.floating) else jnp.int32))
        specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
      else:
        arrays.append(c)
        specs.append(pl.BlockSpec(c.shape, lambda *_, n=c.ndim: (0,) * n))
    return arrays, specs

  def __call__(self, refs, score, b, h, q_idx, kv_idx):
    """The modified scores of a block, inside a kernel (``refs``: the captured arrays)."""
    consts = [kernel_score_mod.View.whole(ref, aval) if smem else ref[...]
              for ref, smem, aval in zip(refs, self.smem, self.avals)]
    return self.apply(_Mosaic(), consts, score, b, h, q_idx, kv_idx)


def _plan_score_mod(score_mod, block_q: int, block_kv: int, interpret: bool):
  """(`_ScoreMod`, captured arrays) for `score_mod`; ValueError if it cannot lower on TPU.

  Evaluated abstractly with every captured array in SMEM, then (checking what
  Mosaic lowers, unless `interpret`) with those read whole moved to VMEM.
  """
  traced, consts = kernel_score_mod.ScoreMod.trace(score_mod, block_q, block_kv)
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in traced.jaxpr.in_avals]

  def run(smem, policy):
    def f(*args):  # score_mod's arguments, then the arrays in VMEM
      vmem = iter(args[5:])
      consts = [kernel_score_mod.View.whole(i, aval) if s else next(vmem)
                for i, (s, aval) in enumerate(zip(smem, avals[5:]))]
      return traced.apply(policy, consts, *args[:5])
    return jax.eval_shape(f, *avals[:5], *(a for s, a in zip(smem, avals[5:]) if not s))

  wide = [False] * len(consts)
  run([True] * len(consts), _Mosaic(wide=wide))
  smem = tuple(not w for w in wide)
  run(smem, _Mosaic(strict=not interpret, wide=[False] * len(consts)))
  return _ScoreMod(traced.fn, traced.jaxpr, smem), consts


# The kernels.


@dataclasses.dataclass(frozen=True)
class _KernelMods:
  """Static: the optional inputs that follow q, k, v (and do, lse, delta) in a kernel's refs.

  Attributes:
    segments: q ids [bq, 128] and kv ids [8, bkv] refs follow.
    sinks: a float32[heads] SMEM ref follows (forward only).
    score_mod: a `_ScoreMod` whose captured arrays' refs follow, or None.
    masks: the masks partial blocks evaluate (`block_lists.masks_for_heads`),
      with an int32[batch * heads] SMEM ref of mask ids first if there are
      several; or None: the partial block's element-mask ref comes first.
  """

  segments: bool
  sinks: bool
  score_mod: _ScoreMod | None
  masks: tuple[masks_lib.Mask, ...] | None = None

  def split(self, refs, b, h, heads):
    """(partial-block visibility, segment id refs or None, sinks ref or None, score_mod refs,
    the remaining refs); the visibility maps (q positions, kv positions) to bool[bq, bkv]."""
    refs = list(refs)
    if self.masks is None:
      table = refs.pop(0)
      partial = lambda q_idx, kv_idx: table[...] != 0  # noqa: E731
    else:
      mask_id = refs.pop(0)[b * heads + h] if len(self.masks) > 1 else None
      partial = functools.partial(block_lists.visible, self.masks, mask_id)
    ids = (refs.pop(0), refs.pop(0)) if self.segments else None
    sinks = refs.pop(0) if self.sinks else None
    n = 0 if self.score_mod is None else len(self.score_mod.smem)
    return partial, ids, sinks, refs[:n], refs[n:]

  def scores(self, q_ref, k_ref, partial, ids, mod_refs, sm_scale, b, h, q_block, kv_block,
             with_slope):
    """A block's scores after score_mod, where they are visible, and d score / d raw score.

    `partial` is the partial-block visibility of `split`, or None for a full
    block; the visibility returned is None where every entry is (a full
    block without segment ids). The slope is None without a score_mod or
    unless `with_slope`.
    """
    s = _dot(q_ref[...], k_ref[...], pallas_common.NT) * sm_scale
    bq, bkv = s.shape
    q_idx = q_block * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    kv_idx = kv_block * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
    visible = None if partial is None else partial(q_idx, kv_idx)
    if ids is not None:
      q_ids, kv_ids = ids
      same = jnp.tile(q_ids[...], (1, bkv // _LANES)) == kv_ids[:1, :]
      visible = same if visible is None else visible & same
    if self.score_mod is None:
      return s, visible, None
    mod = lambda raw: self.score_mod(mod_refs, raw, b, h, q_idx, kv_idx)  # noqa: E731
    if not with_slope:
      return mod(s), visible, None
    s, slope = jax.jvp(mod, (s,), (jnp.ones_like(s),))  # elementwise: the diagonal
    return s, visible, slope


def _by_kind(pidx, step, partial):
  """``step(partial visibility or None)`` under a branch: full blocks (pidx -1) skip masking."""
  lax.cond(pidx >= 0, lambda: step(partial), lambda: step(None))


def _fwd_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, *refs, sm_scale, heads, blocks,
                slots, kmods):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  partial, ids, sinks_ref, mod_refs, (o_ref, lse_ref, m_scratch, l_scratch, acc_scratch) = (
      kmods.split(refs, b, h, heads))
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    m0, l0 = (_NEG, 0.0) if sinks_ref is None else (sinks_ref[h], 1.0)  # the sink: exp(0) = 1
    m_scratch[...] = jnp.full(m_scratch.shape, m0, jnp.float32)
    l_scratch[...] = jnp.full(l_scratch.shape, l0, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(partial):
    s, visible, _ = kmods.scores(q_ref, k_ref, partial, ids, mod_refs, sm_scale, b, h, i,
                                 idx_ref[row * slots + j], False)
    if visible is not None:
      s = jnp.where(visible, s, _NEG)
    m_prev = m_scratch[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, lanes]
    p = jnp.exp(s - m_next[:, :1])
    if visible is not None:
      p = jnp.where(visible, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    pv = _dot(p.astype(v_ref.dtype), v_ref[...], pallas_common.NN)
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

  @pl.when(j < num_ref[row])
  def _step():
    _by_kind(pid_ref[row * slots + j], step, partial)

  @pl.when(j == slots - 1)
  def _finish():
    l = l_scratch[...]
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scratch[...] / safe[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_scratch[...] + jnp.log(safe))


def _ds(kmods, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, partial, ids, mod_refs,
        sm_scale, b, h, q_block, kv_block):
  """A block's probabilities and d loss / d raw score (before sm_scale), for dQ and dK/dV."""
  s, visible, slope = kmods.scores(q_ref, k_ref, partial, ids, mod_refs, sm_scale, b, h, q_block,
                                   kv_block, True)
  p = jnp.exp(s - lse_ref[0][:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = _dot(do_ref[...], v_ref[...], pallas_common.NT)
  ds = p * (dp - delta_ref[0][:, None])
  if slope is not None:
    ds = ds * (slope if visible is None else jnp.where(visible, slope, 0.0))
  return p, ds


def _dq_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, sm_scale, heads, blocks, slots, kmods):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  partial, ids, _, mod_refs, (dq_ref, dq_scratch) = kmods.split(refs, b, h, heads)
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def step(partial):
    _, ds = _ds(kmods, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, partial, ids, mod_refs,
                sm_scale, b, h, i, idx_ref[row * slots + j])
    dq_scratch[...] += _dot(ds.astype(k_ref.dtype), k_ref[...], pallas_common.NN)

  @pl.when(j < num_ref[row])
  def _step():
    _by_kind(pid_ref[row * slots + j], step, partial)

  @pl.when(j == slots - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(num_ref, idx_ref, pid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, sm_scale, heads, blocks, slots, kmods):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  partial, ids, _, mod_refs, (dk_ref, dv_ref, dk_scratch, dv_scratch) = kmods.split(
      refs, b, h, heads)
  row = (b * heads + h) * blocks + i

  @pl.when(j == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def step(partial):
    p, ds = _ds(kmods, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, partial, ids, mod_refs,
                sm_scale, b, h, idx_ref[row * slots + j], i)
    q, do = q_ref[...], do_ref[...]
    dv_scratch[...] += _dot(p.astype(do.dtype), do, pallas_common.TN)
    dk_scratch[...] += _dot(ds.astype(q.dtype), q, pallas_common.TN)

  @pl.when(j < num_ref[row])
  def _step():
    _by_kind(pid_ref[row * slots + j], step, partial)

  @pl.when(j == slots - 1)
  def _finish():
    dk_ref[...] = (dk_scratch[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _extras(layout, batch, q_ids, kv_ids, sinks, consts, score_mod, at_partial, at_q_ids,
            at_kv_ids):
  """The optional kernel inputs after the fixed ones, their BlockSpecs, and their `_KernelMods`.

  First how partial blocks are masked: the layout's element-mask table, a
  block of it per step (`at_partial`), or, with masks computable in the
  kernel, nothing or (several masks) each (batch, head)'s mask id in SMEM.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  arrays, specs = [], []
  masks, mask_id = block_lists.masks_for_heads(layout, batch)
  if masks is None:
    arrays.append(layout.partial.astype(jnp.int32))
    specs.append(pl.BlockSpec((None, layout.block_q, layout.block_kv), at_partial))
  elif mask_id is not None:
    arrays.append(mask_id.reshape(-1))
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  if q_ids is not None:  # ids broadcast over lanes (q) and sublanes (kv), as splash lays them out
    batch, q_len, kv_len = q_ids.shape[0], q_ids.shape[1], kv_ids.shape[1]
    arrays += [jnp.broadcast_to(q_ids[:, :, None], (batch, q_len, _LANES)),
               jnp.broadcast_to(kv_ids[:, None, :], (batch, _SUBLANES, kv_len))]
    specs += [pl.BlockSpec((None, layout.block_q, _LANES), at_q_ids),
              pl.BlockSpec((None, _SUBLANES, layout.block_kv), at_kv_ids)]
  if sinks is not None:
    arrays.append(sinks.astype(jnp.float32))
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  if score_mod is not None:
    mod_arrays, mod_specs = score_mod.inputs(consts)
    arrays, specs = arrays + mod_arrays, specs + mod_specs
  return arrays, specs, _KernelMods(q_ids is not None, sinks is not None, score_mod, masks)


def _forward(q, k, v, layout, q_ids, kv_ids, sinks, consts, score_mod, sm_scale, block_sizes,
             interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, heads, q_len, dim = q.shape
  group = heads // k.shape[1]
  bq, bkv = layout.block_q, layout.block_kv
  nq = q_len // bq
  num, idx, pid, slots = _flat_meta(layout, batch, transposed=False)
  flat = lambda b, h, i, j: ((b * heads + h) * nq + i) * slots + j
  at_q = lambda b, h, i, j, n, x, p: (b, h, i, 0)
  at_kv = lambda b, h, i, j, n, x, p: (b, lax.div(h, group), x[flat(b, h, i, j)], 0)
  extra, extra_specs, kmods = _extras(
      layout, batch, q_ids, kv_ids, sinks, consts, score_mod,
      at_partial=lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat(b, h, i, j)], 0), 0, 0),
      at_q_ids=lambda b, h, i, j, n, x, p: (b, i, 0),
      at_kv_ids=lambda b, h, i, j, n, x, p: (b, 0, x[flat(b, h, i, j)]))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, nq, slots),
      in_specs=[
          pl.BlockSpec((None, None, bq, dim), at_q),
          pl.BlockSpec((None, None, bkv, dim), at_kv),
          pl.BlockSpec((None, None, bkv, dim), at_kv),
          *extra_specs,
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, dim), at_q),
          pl.BlockSpec((None, None, bq, _LANES), at_q),
      ],
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, dim), jnp.float32)],
  )
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, sm_scale=sm_scale, heads=heads, blocks=nq, slots=slots,
                        kmods=kmods),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, _LANES), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="block_sparse_attention_fwd_tpu",
  )(num, idx, pid, q, k, v, *extra)
  return out, lse[..., 0]


def _backward(q, k, v, lse, delta, do, layout, q_ids, kv_ids, consts, score_mod, sm_scale,
              block_sizes, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, heads, q_len, dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bkv = layout.block_q, layout.block_kv
  nq, nk = q_len // bq, kv_len // bkv
  lse_rows, delta_rows = lse[:, :, None, :], delta[:, :, None, :]  # [b, h, 1, t]
  params = None if interpret else _compiler_params(block_sizes)

  num, idx, pid, slots = _flat_meta(layout, batch, transposed=False)
  flat = lambda b, h, i, j: ((b * heads + h) * nq + i) * slots + j
  at_q = lambda b, h, i, j, n, x, p: (b, h, i, 0)
  at_kv = lambda b, h, i, j, n, x, p: (b, lax.div(h, group), x[flat(b, h, i, j)], 0)
  at_row = lambda b, h, i, j, n, x, p: (b, h, 0, i)
  at_partial = lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat(b, h, i, j)], 0), 0, 0)
  extra, extra_specs, kmods = _extras(
      layout, batch, q_ids, kv_ids, None, consts, score_mod, at_partial,
      at_q_ids=lambda b, h, i, j, n, x, p: (b, i, 0),
      at_kv_ids=lambda b, h, i, j, n, x, p: (b, 0, x[flat(b, h, i, j)]))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, heads=heads, blocks=nq, slots=slots,
                        kmods=kmods),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, heads, nq, slots),
          in_specs=[pl.BlockSpec((None, None, bq, dim), at_q),
                    pl.BlockSpec((None, None, bkv, dim), at_kv),
                    pl.BlockSpec((None, None, bkv, dim), at_kv),
                    pl.BlockSpec((None, None, bq, dim), at_q),
                    pl.BlockSpec((None, None, 1, bq), at_row),
                    pl.BlockSpec((None, None, 1, bq), at_row),
                    *extra_specs],
          out_specs=pl.BlockSpec((None, None, bq, dim), at_q),
          scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dq_tpu",
  )(num, idx, pid, q, k, v, do, lse_rows, delta_rows, *extra)

  num_t, idx_t, pid_t, slots_t = _flat_meta(layout, batch, transposed=True)
  flat_t = lambda b, h, i, j: ((b * heads + h) * nk + i) * slots_t + j
  at_k = lambda b, h, i, j, n, x, p: (b, lax.div(h, group), i, 0)
  at_qt = lambda b, h, i, j, n, x, p: (b, h, x[flat_t(b, h, i, j)], 0)
  at_row_t = lambda b, h, i, j, n, x, p: (b, h, 0, x[flat_t(b, h, i, j)])
  at_partial_t = lambda b, h, i, j, n, x, p: (jnp.maximum(p[flat_t(b, h, i, j)], 0), 0, 0)
  at_out = lambda b, h, i, j, n, x, p: (b, h, i, 0)
  extra_t, extra_specs_t, _ = _extras(
      layout, batch, q_ids, kv_ids, None, consts, score_mod, at_partial_t,
      at_q_ids=lambda b, h, i, j, n, x, p: (b, x[flat_t(b, h, i, j)], 0),
      at_kv_ids=lambda b, h, i, j, n, x, p: (b, 0, i))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, heads=heads, blocks=nk, slots=slots_t,
                        kmods=kmods),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, heads, nk, slots_t),
          in_specs=[pl.BlockSpec((None, None, bq, dim), at_qt),
                    pl.BlockSpec((None, None, bkv, dim), at_k),
                    pl.BlockSpec((None, None, bkv, dim), at_k),
                    pl.BlockSpec((None, None, bq, dim), at_qt),
                    pl.BlockSpec((None, None, 1, bq), at_row_t),
                    pl.BlockSpec((None, None, 1, bq), at_row_t),
                    *extra_specs_t],
          out_specs=[pl.BlockSpec((None, None, bkv, dim), at_out)] * 2,
          scratch_shapes=[pltpu.VMEM((bkv, dim), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct((batch, heads, kv_len, dim), k.dtype)] * 2,
      compiler_params=params, interpret=interpret, name="block_sparse_attention_dkv_tpu",
  )(num_t, idx_t, pid_t, q, k, v, do, lse_rows, delta_rows, *extra_t)
  # Per query head; heads that share a key head add up (GQA / MQA).
  dk = dk.reshape(batch, kv_heads, group, kv_len, dim).sum(2)
  dv = dv.reshape(batch, kv_heads, group, kv_len, dim).sum(2)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
@functools.partial(jax.jit,
                   static_argnames=("score_mod", "sm_scale", "block_sizes", "interpret"))
def _attention(q, k, v, layout, q_ids, kv_ids, sinks, consts, score_mod, sm_scale, block_sizes,
               interpret):
  """Block-sparse attention with Pallas TPU kernels.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]
    layout: a `Layout` with block sizes that are multiples of 128 (narrowed
      to the segments' blocks if there are segment ids).
    q_ids, kv_ids: int32[batch, q_len], int32[batch, kv_len], or None.
    sinks: float32[heads] or None.
    consts: the arrays `score_mod` captures (differentiable if floating).
    score_mod: a `_ScoreMod`, or None.
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
  inputs = (q, k, v, layout, q_ids, kv_ids, sinks, consts)
  if q.shape[0] == 0:  # an empty batch launches no programs
    return jnp.zeros_like(q), (*inputs, None, None)
  out, lse = _forward(_heads_major(q), _heads_major(k), _heads_major(v), layout, q_ids, kv_ids,
                      sinks, consts, score_mod, sm_scale, block_sizes, interpret)
  out = _heads_major(out)
  return out, (*inputs, out, lse)


def _bwd(score_mod, sm_scale, block_sizes, interpret, residuals, do):
  q, k, v, layout, q_ids, kv_ids, sinks, consts, out, lse = residuals
  if q.shape[0] == 0:
    zeros = lambda xs: None if xs is None else jax.tree.map(jnp.zeros_like, xs)  # noqa: E731
    return (*zeros((q, k, v)), None, None, None, zeros(sinks),
            mods_lib.const_cotangents(consts, zeros(consts)))
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _backward(*(_heads_major(x) for x in (q, k, v)), lse, delta, _heads_major(do),
                         layout, q_ids, kv_ids, consts, score_mod, sm_scale, block_sizes,
                         interpret)
  dsinks = None if sinks is None else mods_lib.sink_grad(sinks, lse, delta)
  dconsts = ()
  if score_mod is not None:
    dconsts = mods_lib.const_cotangents(consts, mods_lib.const_grads(
        score_mod.fn, consts, q, k, v, do, lse, delta, layout, sm_scale, q_ids, kv_ids))
  return (_heads_major(dq), _heads_major(dk), _heads_major(dv), None, None, None, dsinks,
          dconsts)


_attention.defvjp(_fwd, _bwd)


def block_sparse_attention(q, k, v, layout, sm_scale, block_sizes, interpret,
                           mods: mods_lib.Mods = mods_lib.NONE):
  """The public entry (see `_attention`); `mods` as in `mods.Mods`.

  Raises:
    ValueError: for blocks the kernels cannot tile, and (unless `interpret`)
      for a score_mod that indexes a captured array at vector positions.
  """
  _validate_args(layout, block_sizes)
  score_mod, consts = None, ()
  if mods.score_mod is not None:
    score_mod, consts = _plan_score_mod(mods.score_mod, layout.block_q, layout.block_kv,
                                        interpret)
  return _attention(q, k, v, layout, mods.q_segment_ids, mods.kv_segment_ids, mods.sinks, consts,
                    score_mod, sm_scale, block_sizes, interpret)
