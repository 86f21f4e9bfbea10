"""Explicit sharding (sharding in types) around the mask computations.

Under a mesh with `AxisType.Explicit` axes every array carries its sharding
in its type, and ops that mix shardings or sort along a sharded dim are
errors. Mask selection ranks entries across a whole leaf (flattening, sorting,
counting), so `sparsify` gathers the inputs of a mask update (replicated),
and gives the new masks the sharding of their params. Under automatic
sharding (GSPMD) and on one device these are no-ops.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from sparsejax._src import pytree


def _explicit_spec(x) -> PartitionSpec | None:
  """x's partition spec if x is sharded over explicit mesh axes, else None."""
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding.spec


def gathered(tree):
  """`tree` with explicitly sharded leaves made replicated."""
  def one(x):
    spec = None if x is None else _explicit_spec(x)
    if spec is None or all(s is None for s in spec):
      return x
    return jax.sharding.reshard(x, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=pytree.is_none)


def like(tree, reference):
  """`tree` resharded leaf by leaf like `reference` (same structure) where explicit."""
  def one(x, ref):
    spec = None if x is None or ref is None else _explicit_spec(ref)
    if spec is None or _explicit_spec(x) == spec:
      return x
    return jax.sharding.reshard(x, spec)
  return jax.tree.map(one, tree, reference, is_leaf=pytree.is_none)
