"""Block-sparse Dense layers for flax nnx and linen.

A layer holds a dense-shaped ``[in, out]`` kernel and, optionally, a block
mask over its ``(in // bk, out // bn)`` block grid:

* Without a block mask the layer multiplies by the whole kernel. Train it
  with ``sj.sparsify(opt, sj.rigl(..., granularity=sj.Block(block_shape)))``:
  the optimizer keeps the masks and zeroes the pruned blocks exactly, and
  gradient-based growth needs the dense gradient anyway.
* With a block mask (a static pattern such as `block_diagonal_mask`, or the
  trained pattern from `to_block_sparse`) the layer runs
  `block_sparse_matmul` over the active blocks only, forward and backward;
  the kernel's other blocks are never read and get zero gradient.

`to_block_sparse` turns layers trained the first way into the second for
inference: same outputs, only the active blocks computed.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.matmul import api
from sparsejax._src.matmul import format as format_lib

_default_kernel_init = nnx.initializers.lecun_normal()


class BlockMask(nnx.Variable):
  """The block grid mask of a `BlockSparseLinear` (not a trainable param)."""


def _check_layer(in_features, out_features, block_shape, block_mask, low_rank):
  for name, value, minimum in [("in_features", in_features, 1),
                               ("out_features", out_features, 1), ("low_rank", low_rank, 0)]:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  bk, bn = format_lib._check_block_shape((in_features, out_features), block_shape)  # pylint: disable=protected-access
  if block_mask is not None:
    block_mask = np.asarray(block_mask)
    grid = (in_features // bk, out_features // bn)
    if block_mask.shape != grid or block_mask.dtype != bool:
      raise ValueError(f"block_mask must be bool of shape {grid} (the block grid of a "
                       f"({in_features}, {out_features}) kernel in {(bk, bn)} blocks), got "
                       f"{block_mask.dtype} of shape {block_mask.shape}")
  return (bk, bn), block_mask


def _expand(block_mask: np.ndarray, block_shape) -> np.ndarray:
  return np.kron(block_mask, np.ones(block_shape, bool))


def _apply(x, kernel, bias, low_rank, block_mask, slots, implementation, dtype):
  dtype = dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if block_mask is None:
    y = jnp.dot(x, kernel)
  else:
    w = format_lib.BlockSparseMatrix.from_dense(kernel, block_mask, max_per_col=slots[0],
                                                max_per_row=slots[1])
    y = api.block_sparse_matmul(x, w, implementation=implementation)
  if low_rank is not None:
    y = y + jnp.dot(jnp.dot(x, low_rank[0].astype(dtype)), low_rank[1].astype(dtype))
  if bias is not None:
    y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + bias.shape)
  return y


class BlockSparseLinear(nnx.Module):
  """A Dense layer (flax nnx) whose kernel is sparse in blocks.

  Args:
    in_features: input size, divisible by ``block_shape[0]``.
    out_features: output size, divisible by ``block_shape[1]``.
    block_shape: (bk, bn) tile of the kernel.
    block_mask: None (dense-shaped kernel; sparsify it with a block-granular
      method), or bool[in // bk, out // bn]: the active blocks, computed with
      `block_sparse_matmul`; the kernel starts at zero outside them.
    low_rank: rank of an extra dense ``x @ A @ B`` term (0: none); with
      `butterfly_mask` this is Pixelated Butterfly.
    use_bias: add a bias.
    implementation: passed to `block_sparse_matmul` (None: the fastest).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the params.
    kernel_init: initializer of the kernel (and of A).
    rngs: `nnx.Rngs`.

  Example:
    >>> layer = sj.flax.BlockSparseLinear(256, 256, block_shape=(32, 32),
    ...                                   block_mask=sj.butterfly_mask((8, 8)), rngs=nnx.Rngs(0))
    >>> y = layer(x)
  """

  def __init__(self, in_features: int, out_features: int, *, block_shape: tuple[int, int],
               rngs: nnx.Rngs, block_mask: Any = None, low_rank: int = 0,
               use_bias: bool = True, implementation: str | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, kernel_init: Any = _default_kernel_init):
    self.block_shape, block_mask = _check_layer(in_features, out_features, block_shape,
                                                block_mask, low_rank)
    self.in_features, self.out_features = in_features, out_features
    self.implementation, self.dtype = implementation, dtype
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.block_mask, self.slots = nnx.data(None), None
    if block_mask is not None:
      kernel = jnp.where(_expand(block_mask, self.block_shape), kernel, 0)
      self.block_mask = BlockMask(jnp.asarray(block_mask))
      self.slots = format_lib.slot_counts(block_mask)
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
    self.low_rank_a = self.low_rank_b = nnx.data(None)
    if low_rank:
      self.low_rank_a = nnx.Param(kernel_init(rngs.params(), (in_features, low_rank), param_dtype))
      self.low_rank_b = nnx.Param(jnp.zeros((low_rank, out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features]."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x of shape {x.shape} must end in in_features={self.in_features}")
    mask = None if self.block_mask is None else self.block_mask[...]
    return _apply(x, self.kernel[...], None if self.bias is None else self.bias[...],
                  None if self.low_rank_a is None else (self.low_rank_a[...],
                                                        self.low_rank_b[...]), mask, self.slots,
                  self.implementation, self.dtype)


class BlockSparseDense(nn.Module):
  """A Dense layer (flax linen) whose kernel is sparse in blocks.

  Attributes:
    features: output size, divisible by ``block_shape[1]``.
    block_shape: (bk, bn) tile of the kernel.
    block_mask: None (dense-shaped kernel; sparsify it with a block-granular
      method), or a NumPy bool[in // bk, features // bn]: the active blocks,
      computed with `block_sparse_matmul`; the kernel starts at zero outside.
    low_rank: rank of an extra dense ``x @ A @ B`` term (0: none).
    use_bias: add a bias.
    implementation: passed to `block_sparse_matmul` (None: the fastest).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the params.
    kernel_init: initializer of the kernel (and of A).

  Example:
    >>> layer = sj.flax.BlockSparseDense(256, block_shape=(32, 32),
    ...                                  block_mask=sj.block_diagonal_mask((8, 8), 4))
    >>> params = layer.init(key, x)
  """

  features: int
  block_shape: tuple[int, int]
  block_mask: Any = None
  low_rank: int = 0
  use_bias: bool = True
  implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = _default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., features]."""
    block_shape, block_mask = _check_layer(x.shape[-1], self.features, self.block_shape,
                                           self.block_mask, self.low_rank)
    shape = (x.shape[-1], self.features)

    def init(key, shape, dtype):
      kernel = self.kernel_init(key, shape, dtype)
      return kernel if block_mask is None else jnp.where(_expand(block_mask, block_shape),
                                                        kernel, 0)

    kernel = self.param("kernel", init, shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      self.param_dtype) if self.use_bias else None
    low_rank = None
    if self.low_rank:
      low_rank = (self.param("low_rank_a", self.kernel_init, (shape[0], self.low_rank),
                             self.param_dtype),
                  self.param("low_rank_b", nn.initializers.zeros, (self.low_rank, self.features),
                             self.param_dtype))
    slots = None if block_mask is None else format_lib.slot_counts(block_mask)
    return _apply(x, kernel, bias, low_rank, block_mask, slots, self.implementation, self.dtype)


def to_block_sparse(model: Any) -> Any:
  """Switches every mask-less `BlockSparseLinear` in `model` to its kernel's blocks.

  After training with a block-granular method (pruned blocks exactly zero),
  this sets each layer's `block_mask` to the blocks of its kernel that hold a
  nonzero, so the layer computes only those: same outputs, less work. A
  block that is active in the optimizer but still all zero (a freshly grown
  one) contributes nothing and is left out. Works in place on an nnx model
  (or a single layer) and returns it. For linen, build a `BlockSparseDense`
  with ``block_mask=np.asarray(BlockSparseMatrix.from_dense(kernel,
  block_shape=...).block_mask())``.

  Args:
    model: an nnx Module containing `BlockSparseLinear` layers.

  Returns:
    The same model.

  Example:
    >>> sj.flax.to_block_sparse(model)   # after training
    >>> logits = model(x)                # now block-sparse matmuls
  """
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, BlockSparseLinear) and layer.block_mask is None:
      mask = format_lib.nonzero_blocks(layer.kernel[...], layer.block_shape)
      layer.block_mask, layer.slots = BlockMask(jnp.asarray(mask)), format_lib.slot_counts(mask)
  return model
