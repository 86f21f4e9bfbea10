"""`sparse_input_matmul` as a Pallas TPU kernel (Mosaic, scalar prefetch).

The listed channels and their count (`sparse_input.NonzeroIndex`) are
prefetched into SMEM and drive the index maps. ``w`` is viewed, by a
reshape, as ``[K, 1, N]``, so one row's ``block_n`` columns are a legal
``(1, block_n)`` block, and the kernel takes that view ``block_k`` times:
each grid step DMAs the blocks of ``block_k`` listed rows (the pipeline
double-buffers them) and adds ``values[:, u] * row`` for each in float32 on
the VPU, into the output block, which stays in VMEM over the step axis. The
grid is ``(N // block_n, ceil(count / block_k))``, its second axis as long
as the list: only the listed rows are read and the number of steps follows
the number of nonzeros. Slots past the count map to the last listed row (no
new DMA) and multiply zeros. Inference only: `sparse_input` owns the
gradient. Runs on TPU, and on CPU with ``interpret=True``.

Not measured on TPU hardware: whether XLA keeps the ``[K, 1, N]`` view of
``w`` without a copy depends on the layout it assigns to it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax._src import _checks
from sparsejax._src import pallas_common

_LANES = pallas_common.LANES
_SUBLANES = pallas_common.SUBLANES


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and settings of the TPU sparse-input kernel.

  Attributes:
    block_n: output columns per program, a multiple of 128; the largest
      multiple of 128 at most this that divides N is used.
    block_k: listed rows of w per grid step (one DMA each).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler's default).
  """

  block_n: int = 2048
  block_k: int = 16
  vmem_limit_bytes: int | None = None

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _compiler_params(block_sizes: BlockSizes):
  """The backend choice, in one place: Mosaic TPU; the list is the reduction axis."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                              vmem_limit_bytes=block_sizes.vmem_limit_bytes)


def tiles(n: int) -> bool:
  """Whether the kernel takes a w of `n` columns."""
  return n % _LANES == 0


def _validate_args(x2: jax.Array, w: jax.Array, block_sizes: BlockSizes):
  """The kernel's own constraints; `sparse_input_matmul` has checked shapes and dtypes."""
  if x2.shape[0] > 2 * _SUBLANES:
    raise ValueError(f"the TPU sparse-input kernel takes at most {2 * _SUBLANES} rows of x, got "
                     f"{x2.shape[0]}")
  if not tiles(w.shape[1]):
    raise ValueError(f"w.shape[1]={w.shape[1]} (N) must be a multiple of {_LANES} (the TPU lane "
                     f"width) for the TPU sparse-input kernel; pad w's columns to a multiple of "
                     f"{_LANES} or use implementation=\"xla\"")
  block_n = block_sizes.block_n
  if not _checks.is_int(block_n) or block_n < _LANES or block_n % _LANES:
    raise ValueError(f"block_n={block_n!r} must be a positive multiple of {_LANES}")
  _checks.static_int("block_k", block_sizes.block_k, minimum=1)
  _checks.vmem_limit(block_sizes.vmem_limit_bytes)


def _kernel(count_ref, indices_ref, values_ref, *refs):
  del indices_ref  # read by the index maps
  *rows, out_ref = refs
  c = pl.program_id(1)

  @pl.when(c == 0)
  def _init():
    out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

  @pl.when(c * len(rows) < count_ref[0])
  def _step():
    values = values_ref[...]  # [rows of x, block_k], zero past the count
    acc = out_ref[...]
    for u, row_ref in enumerate(rows):  # row_ref: [1, block_n], listed row c * block_k + u
      acc += values[:, u:u + 1] * row_ref[...].astype(jnp.float32)
    out_ref[...] = acc


def _block_n(n: int, block_n: int) -> int:
  """The largest multiple of 128 dividing `n` and at most `block_n`."""
  return _LANES * max(d for d in range(1, block_n // _LANES + 1) if (n // _LANES) % d == 0)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_input_matmul(x2: jax.Array, w: jax.Array, index, *,
                        block_sizes: BlockSizes = BlockSizes.get_default(),
                        interpret: bool = False) -> jax.Array:
  """``x2 @ w`` reading only the rows of `w` that `index` lists, with the Mosaic kernel.

  The arguments and result are those of the Triton kernel's entry
  (`sparse_input_pallas_gpu.sparse_input_matmul`: x2 [M, K] of 1 to 16 rows,
  w [K, N], index the `sparse_input.NonzeroIndex` of x2, a float32 [M, N]
  result), with this module's `BlockSizes` and N a multiple of 128 (the TPU
  lane width).
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  _validate_args(x2, w, block_sizes)
  (m, k), n = x2.shape, w.shape[1]
  block_k = block_sizes.block_k
  block_n = _block_n(n, block_sizes.block_n)
  rows = _SUBLANES * pl.cdiv(m, _SUBLANES)
  chunks = pl.cdiv(k, block_k)
  _, values = index.listed(x2, block_k)
  values = jnp.pad(values.astype(jnp.float32), [(0, rows - m), (0, 0)])
  values = values.reshape(rows, chunks, block_k).transpose(1, 0, 2)  # [chunks, rows, block_k]
  steps = jnp.maximum(pl.cdiv(index.count, block_k), 1)  # step 0 zeroes the output

  def row_map(u):
    def at_row(j, c, count, indices):
      return indices[jnp.maximum(jnp.minimum(c * block_k + u, count[0] - 1), 0)], 0, j
    return at_row

  return pl.pallas_call(
      _kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(n // block_n, steps),
          in_specs=[pl.BlockSpec((None, rows, block_k), lambda j, c, *_: (c, 0, 0)),
                    *(pl.BlockSpec((None, 1, block_n), row_map(u)) for u in range(block_k))],
          out_specs=pl.BlockSpec((rows, block_n), lambda j, c, *_: (0, j))),
      out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32),
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="sparse_input_matmul_tpu",
  )(index.count.reshape(1), index.indices, values, *[w.reshape(k, 1, n)] * block_k)[:m]
