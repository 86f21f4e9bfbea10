"""Block-sparse Dense layers for flax nnx and linen.

A layer holds a dense-shaped ``[in, out]`` kernel and, optionally, a layout:
a bool array over its ``(in // bk, out // bn)`` block grid.

* Without a layout the layer multiplies by the whole kernel. Train it with
  ``sj.sparsify(opt, sj.rigl(..., granularity=sj.Block(block_shape)))``: the
  optimizer keeps the masks and zeroes the pruned blocks exactly, and
  gradient-based growth needs the dense gradient anyway.
* With a layout (a static pattern such as `block_diagonal_layout`, or the
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

from sparsejax._src import _checks
from sparsejax._src.matmul import api
from sparsejax._src.matmul import format as format_lib

_default_kernel_init = nnx.initializers.lecun_normal()


class BlockLayout(nnx.Variable):
  """The layout (active blocks) of a `BlockSparseLinear`; not a trainable param."""


def _check_layer(in_features, out_features, block_shape, layout, low_rank):
  for name, value, minimum in [("in_features", in_features, 1),
                               ("out_features", out_features, 1), ("low_rank", low_rank, 0)]:
    if not _checks.is_int(value) or value < minimum:
      raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  bk, bn = format_lib.check_block_shape((in_features, out_features), block_shape)
  if layout is not None:
    layout = np.asarray(layout)
    grid = (in_features // bk, out_features // bn)
    if layout.shape != grid or layout.dtype != bool:
      raise ValueError(f"layout must be bool of shape {grid} (the block grid of a "
                       f"({in_features}, {out_features}) kernel in {(bk, bn)} blocks), got "
                       f"{layout.dtype} of shape {layout.shape}")
  return (bk, bn), layout


def _masked_init(kernel_init, layout, block_shape):
  """`kernel_init`, zero outside the active blocks of `layout` (if any)."""
  if layout is None:
    return kernel_init
  expanded = np.kron(layout, np.ones(block_shape, bool))
  return lambda key, shape, dtype: jnp.where(expanded, kernel_init(key, shape, dtype), 0)


def _value(variable):
  return None if variable is None else variable[...]


def _apply(x, kernel, bias, low_rank, layout, slots, implementation, dtype):
  dtype = dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if layout is None:
    y = jnp.dot(x, kernel)
  else:
    w = format_lib.BlockSparseMatrix.from_dense(kernel, layout, max_per_col=slots[0],
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
    layout: None (dense-shaped kernel; sparsify it with a block-granular
      method), or bool[in // bk, out // bn]: the active blocks, computed with
      `block_sparse_matmul`; the kernel starts at zero outside them.
    low_rank: rank of an extra dense ``x @ A @ B`` term (0: none); with
      `butterfly_layout` this is Pixelated Butterfly.
    use_bias: add a bias.
    implementation: passed to `block_sparse_matmul` (None: the fastest).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the params.
    kernel_init: initializer of the kernel (and of A).
    rngs: `nnx.Rngs`.

  Example:
    >>> layer = sj.nn.BlockSparseLinear(256, 256, block_shape=(32, 32),
    ...                                 layout=sj.matmul.butterfly_layout((8, 8)),
    ...                                 rngs=nnx.Rngs(0))
    >>> y = layer(x)
  """

  def __init__(self, in_features: int, out_features: int, *, block_shape: tuple[int, int],
               rngs: nnx.Rngs, layout: Any = None, low_rank: int = 0,
               use_bias: bool = True, implementation: str | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, kernel_init: Any = _default_kernel_init):
    self.block_shape, layout = _check_layer(in_features, out_features, block_shape, layout,
                                            low_rank)
    self.in_features, self.out_features = in_features, out_features
    self.implementation, self.dtype = implementation, dtype
    init = _masked_init(kernel_init, layout, self.block_shape)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.layout, self.slots = nnx.data(None), None
    if layout is not None:
      self.layout, self.slots = BlockLayout(jnp.asarray(layout)), format_lib.slot_counts(layout)
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
    self.low_rank_a = self.low_rank_b = nnx.data(None)
    if low_rank:
      self.low_rank_a = nnx.Param(kernel_init(rngs.params(), (in_features, low_rank), param_dtype))
      self.low_rank_b = nnx.Param(jnp.zeros((low_rank, out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features]."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x of shape {x.shape} must end in in_features={self.in_features}")
    low_rank = None if self.low_rank_a is None else (self.low_rank_a[...], self.low_rank_b[...])
    return _apply(x, self.kernel[...], _value(self.bias), low_rank, _value(self.layout),
                  self.slots, self.implementation, self.dtype)


class BlockSparseDense(nn.Module):
  """A Dense layer (flax linen) whose kernel is sparse in blocks.

  Attributes:
    features: output size, divisible by ``block_shape[1]``.
    block_shape: (bk, bn) tile of the kernel.
    layout: None (dense-shaped kernel; sparsify it with a block-granular
      method), or a NumPy bool[in // bk, features // bn]: the active blocks,
      computed with `block_sparse_matmul`; the kernel starts at zero outside.
    low_rank: rank of an extra dense ``x @ A @ B`` term (0: none).
    use_bias: add a bias.
    implementation: passed to `block_sparse_matmul` (None: the fastest).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the params.
    kernel_init: initializer of the kernel (and of A).

  Example:
    >>> layer = sj.nn.BlockSparseDense(256, block_shape=(32, 32),
    ...                                layout=sj.matmul.block_diagonal_layout((8, 8), 4))
    >>> params = layer.init(key, x)
  """

  features: int
  block_shape: tuple[int, int]
  layout: Any = None
  low_rank: int = 0
  use_bias: bool = True
  implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = _default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., features]."""
    block_shape, layout = _check_layer(x.shape[-1], self.features, self.block_shape,
                                       self.layout, self.low_rank)
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", _masked_init(self.kernel_init, layout, block_shape), shape,
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      self.param_dtype) if self.use_bias else None
    low_rank = None
    if self.low_rank:
      low_rank = (self.param("low_rank_a", self.kernel_init, (shape[0], self.low_rank),
                             self.param_dtype),
                  self.param("low_rank_b", nn.initializers.zeros, (self.low_rank, self.features),
                             self.param_dtype))
    slots = None if layout is None else format_lib.slot_counts(layout)
    return _apply(x, kernel, bias, low_rank, layout, slots, self.implementation, self.dtype)


def to_block_sparse(model: Any) -> Any:
  """Gives every layout-less `BlockSparseLinear` in `model` its kernel's nonzero blocks.

  After training with a block-granular method (pruned blocks exactly zero),
  this sets each layer's `layout` to the blocks of its kernel that hold a
  nonzero, so the layer computes only those: same outputs, less work. A
  block that is active in the optimizer but still all zero (a freshly grown
  one) contributes nothing and is left out. Works in place on an nnx model
  (or a single layer) and returns it. For linen, build a `BlockSparseDense`
  with ``layout=np.asarray(BlockSparseMatrix.from_dense(kernel,
  block_shape=...).layout())``.

  Args:
    model: an nnx Module containing `BlockSparseLinear` layers.

  Returns:
    The same model.

  Example:
    >>> sj.nn.to_block_sparse(model)   # after training
    >>> logits = model(x)              # now block-sparse matmuls
  """
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, BlockSparseLinear) and layer.layout is None:
      layout = format_lib.nonzero_layout(layer.kernel[...], layer.block_shape)
      layer.layout, layer.slots = BlockLayout(jnp.asarray(layout)), format_lib.slot_counts(layout)
  return model
