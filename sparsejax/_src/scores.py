"""Importance scores that methods rank entries by.

Each function takes trees restricted to the sparsified leaves (``None`` at
dense leaves) and returns scores in the same form. Inactive entries score
``-inf`` where a method must not bring them back on its own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src import pytree

PyTree = Any


def check_key(key: jax.Array) -> None:
  """Raises ValueError unless `key` is one JAX PRNG key (typed, or raw uint32[2])."""
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))
  if not ok:
    raise ValueError(f"key must be a JAX PRNG key such as jax.random.key(0), got {key!r}")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape != ():
    raise ValueError(f"key must be a single PRNG key such as jax.random.key(0), got an array of "
                     f"keys of shape {key.shape}")


def magnitude(params: PyTree, masks: PyTree) -> PyTree:
  """``|w|`` for active entries, ``-inf`` for pruned ones."""
  return jax.tree.map(lambda w, m: jnp.where(m, jnp.abs(w).astype(jnp.float32), -jnp.inf),
                      params, masks)


def saliency(params: PyTree, grads: PyTree, masks: PyTree) -> PyTree:
  """SNIP connection sensitivity ``|w * g|`` for active entries, ``-inf`` otherwise."""
  return jax.tree.map(
      lambda w, g, m: jnp.where(m, jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)),
                                -jnp.inf),
      params, grads, masks)


def random(masks: PyTree, key: jax.Array) -> PyTree:
  """Uniform random scores in [0, 1) per sparsified leaf, one key per leaf index."""
  leaves, treedef = pytree.flatten(masks)
  out = [None if m is None else jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(m))
         for i, (_, m) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)
