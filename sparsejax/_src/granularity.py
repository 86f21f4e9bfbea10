"""Structured sparsity: the unit a mask turns on or off.

By default a unit is one entry. `Block` tiles a leaf into `block_shape` tiles
and `Channel` takes whole slices along an axis (rows, columns, filters). A
method scores entries as usual; the scores are pooled per unit (mean or max),
the top units are kept, and the unit mask is expanded back to the leaf's
shape, so every tile or channel is entirely on or entirely off.

Block masks are what a block-sparse matmul accelerates:
`sparsejax.matmul.block_layout` exports the tile-level layout of a mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src import pytree

_REDUCERS = {"mean": jnp.mean, "max": jnp.max}


@dataclasses.dataclass(frozen=True)
class Block:
  """Tiles of `block_shape` over the trailing dims of a leaf, on or off together.

  A leaf of shape ``(..., d1, d2)`` with ``block_shape=(b1, b2)`` has units of
  ``b1 x b2`` entries (leading dims are tiled by 1); each of ``d1, d2`` must
  be divisible by its block size.

  Attributes:
    block_shape: tile shape, at most as many dims as the leaf.
    reduce: how entry scores make a tile's score: "mean" or "max".

  Example:
    >>> method = sj.magnitude(0.9, granularity=sj.Block((16, 16)))
  """

  block_shape: tuple[int, ...]
  reduce: str = "mean"

  def __post_init__(self):
    try:
      shape = tuple(self.block_shape)
    except TypeError:
      shape = ()
    if not shape or not all(_checks.is_int(b) and b >= 1 for b in shape):
      raise ValueError(f"block_shape={self.block_shape!r} must be a tuple of integers >= 1")
    object.__setattr__(self, "block_shape", tuple(int(b) for b in shape))
    _checks.choice("reduce", self.reduce, tuple(_REDUCERS))

  def _full(self, shape):
    return (1,) * (len(shape) - len(self.block_shape)) + self.block_shape

  def check(self, path: pytree.Path, shape: tuple[int, ...]) -> None:
    if len(self.block_shape) > len(shape):
      raise ValueError(f"{pytree.describe(path)} of shape {shape} has fewer dims than "
                       f"block_shape={self.block_shape}")
    if any(d % b for d, b in zip(shape, self._full(shape))):
      raise ValueError(f"block_shape={self.block_shape} does not divide "
                       f"{pytree.describe(path)} of shape {shape}")

  def units(self, shape):
    return tuple(d // b for d, b in zip(shape, self._full(shape)))

  def pool(self, x: jax.Array, reduce: str | None = None) -> jax.Array:
    full = self._full(x.shape)
    split = [s for d, b in zip(x.shape, full) for s in (d // b, b)]
    axes = tuple(range(1, 2 * x.ndim, 2))
    return _REDUCERS[reduce or self.reduce](x.reshape(split), axis=axes)

  def expand(self, u: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    full = self._full(shape)
    for axis, b in enumerate(full):
      u = jnp.repeat(u, b, axis=axis) if b > 1 else u
    return u


@dataclasses.dataclass(frozen=True)
class Channel:
  """Whole slices along `axis`, on or off together (structured channel pruning).

  For a Dense kernel ``(in, out)``, ``axis=-1`` keeps or removes output
  neurons (columns) and ``axis=-2`` input features (rows); for a conv kernel
  ``(h, w, in, out)``, ``axis=-1`` removes filters.

  Attributes:
    axis: the axis whose indices are the units.
    reduce: how entry scores make a channel's score: "mean" or "max".

  Example:
    >>> method = sj.magnitude(0.5, granularity=sj.Channel(axis=-1))
  """

  axis: int = -1
  reduce: str = "mean"

  def __post_init__(self):
    if not _checks.is_int(self.axis):
      raise ValueError(f"axis={self.axis!r} must be an integer")
    object.__setattr__(self, "axis", int(self.axis))
    _checks.choice("reduce", self.reduce, tuple(_REDUCERS))

  def check(self, path: pytree.Path, shape: tuple[int, ...]) -> None:
    if not -len(shape) <= self.axis < len(shape):
      raise ValueError(f"axis={self.axis} is out of range for {pytree.describe(path)} "
                       f"of shape {shape}")

  def units(self, shape):
    return (shape[self.axis],)

  def pool(self, x: jax.Array, reduce: str | None = None) -> jax.Array:
    others = tuple(a for a in range(x.ndim) if a != self.axis % x.ndim)
    return _REDUCERS[reduce or self.reduce](x, axis=others)

  def expand(self, u: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    axis = self.axis % len(shape)
    u = u.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return jnp.broadcast_to(u, shape)


class _Element:
  """One entry per unit (unstructured sparsity)."""

  def check(self, path, shape):
    del path, shape

  def units(self, shape):
    return shape

  def pool(self, x, reduce=None):
    del reduce
    return x

  def expand(self, u, shape):
    del shape
    return u


Granularity = Union[Block, Channel, None]
_ELEMENT = _Element()


def as_granularity(granularity: Any):
  """The unit machinery for None (entries), a `Block` or a `Channel`."""
  if granularity is None:
    return _ELEMENT
  if isinstance(granularity, (Block, Channel)):
    return granularity
  raise ValueError(
      f"granularity must be None, sj.Block(block_shape) or sj.Channel(axis), got {granularity!r}")
