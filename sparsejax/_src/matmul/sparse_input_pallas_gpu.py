"""`sparse_input_matmul` as a Pallas kernel for GPUs (Triton backend).

The grid is ``(N // block_n, splits)``. A program owns ``block_n`` columns
of the output and an even share of the chunks of ``block_k`` listed channels
(`sparse_input.NonzeroIndex`): per chunk it loads the chunk's channel
numbers, gathers those rows of ``w`` (``[block_k, block_n]``, one vector-
indexed load) and adds ``values @ rows`` in float32, where ``values`` are the
inputs at the listed channels, compacted in the wrapper (zero past the count,
rows padded to 16, Triton's smallest dot operand). The loop runs
``ceil(count / block_k)`` chunks in all, so only the listed rows of ``w``
are read and the cost follows the number of nonzeros; the splits sum in the
wrapper. Inference only: `sparse_input` owns the gradient. Runs on Ampere
and newer through the Triton backend; on CPU with ``interpret=True``.
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

_MIN_TILE = 16  # Triton's smallest dot operand: rows of x are padded to it


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch settings of the GPU sparse-input kernel.

  Attributes:
    block_n: output columns per program, a power of 2 >= 16; the largest
      power of 2 at most this that divides N is used.
    block_k: listed channels (rows of w) per loop step, a power of 2 >= 16.
    programs: programs to aim for (``N // block_n * splits``): the list is
      split among that many when N has fewer tiles, to fill a large GPU.
    num_warps: warps per program.
    num_stages: software pipelining stages.
  """

  block_n: int = 128
  block_k: int = 32
  programs: int = 256
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _compiler_params(block_sizes: BlockSizes):
  """The backend choice, in one place: Triton, which runs on Ampere and newer."""
  return pallas_common.triton_params(block_sizes.num_warps, block_sizes.num_stages)


def tiles(n: int) -> bool:
  """Whether the kernel takes a w of `n` columns."""
  return n % _MIN_TILE == 0


def _validate_args(x2: jax.Array, w: jax.Array, block_sizes: BlockSizes):
  """The kernel's own constraints; `sparse_input_matmul` has checked shapes and dtypes."""
  if x2.shape[0] > _MIN_TILE:
    raise ValueError(f"the Triton sparse-input kernel takes at most {_MIN_TILE} rows of x, got "
                     f"{x2.shape[0]}")
  if not tiles(w.shape[1]):
    raise ValueError(f"w.shape[1]={w.shape[1]} (N) must be a multiple of {_MIN_TILE} for the "
                     f"Triton sparse-input kernel; pad w's columns or use implementation=\"xla\"")
  for name in ("block_n", "block_k"):
    size = getattr(block_sizes, name)
    if not _checks.is_int(size) or size < _MIN_TILE or size & (size - 1):
      raise ValueError(f"{name}={size!r} must be a power of 2 >= {_MIN_TILE}")
  for name in ("programs", "num_warps", "num_stages"):
    _checks.static_int(name, getattr(block_sizes, name), minimum=1)


def _kernel(count_ref, indices_ref, values_ref, w_ref, out_ref, *, block_k, splits):
  j, s = pl.program_id(0), pl.program_id(1)
  block_n = out_ref.shape[-1]
  cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
  steps = (count_ref[0] + block_k - 1) // block_k
  share = (steps + splits - 1) // splits

  def body(c, acc):
    chunk = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
    rows = w_ref[indices_ref[chunk], cols]  # [block_k, block_n]: the listed rows, gathered
    return acc + lax.dot_general(values_ref[:, chunk], rows, pallas_common.NN,
                                 precision=lax.Precision.HIGHEST,  # f32: IEEE, not TF32
                                 preferred_element_type=jnp.float32)

  start = s * share
  out_ref[...] = lax.fori_loop(start, jnp.minimum(start + share, steps), body,
                               jnp.zeros(out_ref.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_input_matmul(x2: jax.Array, w: jax.Array, index, *,
                        block_sizes: BlockSizes = BlockSizes.get_default(),
                        interpret: bool = False) -> jax.Array:
  """``x2 @ w`` reading only the rows of `w` that `index` lists, with the Triton kernel.

  Args:
    x2: [M, K], 1 <= M <= 16 rows.
    w: [K, N], x2's dtype; N a multiple of 16 (the output tiles divide it).
    index: the `sparse_input.NonzeroIndex` of x2.
    block_sizes: `BlockSizes`.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    [M, N] float32.
  """
  _validate_args(x2, w, block_sizes)
  (m, k), n = x2.shape, w.shape[1]
  block_k = block_sizes.block_k
  block_n = min(block_sizes.block_n, n & -n)  # the largest power of 2 dividing n, at most this
  chunks = pl.cdiv(k, block_k)
  splits = max(1, min(chunks, pl.cdiv(block_sizes.programs, n // block_n)))
  indices, values = index.listed(x2, block_k)
  values = jnp.pad(values, [(0, _MIN_TILE - m), (0, 0)])  # [16, chunks * block_k]
  whole = lambda a: pl.BlockSpec(a.shape, lambda j, s, d=a.ndim: (0,) * d)  # noqa: E731
  count = index.count.reshape(1)
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, splits=splits),
      grid=(n // block_n, splits),
      in_specs=[whole(count), whole(indices), whole(values), whole(w)],
      out_specs=pl.BlockSpec((None, _MIN_TILE, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splits, _MIN_TILE, n), jnp.float32),
      compiler_params=None if interpret else _compiler_params(block_sizes),
      interpret=interpret,
      name="sparse_input_matmul_triton",
  )(count, indices, values, w)
  return jnp.sum(out, axis=0)[:m]
