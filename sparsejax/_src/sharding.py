"""Explicit sharding (sharding in types) around the mask computations.

Under a mesh with `AxisType.Explicit` axes every array carries its sharding
in its type, and ops that mix shardings or sort along a sharded dim are
errors. Mask selection ranks entries across a whole leaf (flattening, sorting,
counting), so `sparsify` gathers the inputs of a mask update (replicated),
and gives the new masks the sharding of their params. Calibration keeps
its token rows sharded like the batch, and post-training pruning solves one
layer at a time on the params' mesh with automatic axes. Under automatic
sharding (GSPMD) and on one device these are no-ops.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sparsejax._src import pytree


def explicit_spec(x) -> PartitionSpec | None:
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
    spec = None if x is None else explicit_spec(x)
    if spec is None or all(s is None for s in spec):
      return x
    return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec()))
  return jax.tree.map(one, tree, is_leaf=pytree.is_none)


def like(tree, reference):
  """`tree` resharded leaf by leaf like `reference` (same structure) where explicit."""
  def one(x, ref):
    spec = None if x is None or ref is None else explicit_spec(ref)
    if spec is None or explicit_spec(x) == spec:
      return x
    return jax.sharding.reshard(x, spec)
  return jax.tree.map(one, tree, reference, is_leaf=pytree.is_none)


def rows(x, width: int):
  """``x.reshape(-1, width)``; under explicit sharding the rows keep the leading dim's axes."""
  spec = explicit_spec(x)
  if spec is None:
    return x.reshape(-1, width)
  lead = tuple(spec)[0] if len(spec) else None
  out = NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(lead, None))
  x = jax.sharding.reshard(x, NamedSharding(out.mesh, PartitionSpec(lead, *[None] * (x.ndim - 1))))
  return jax.numpy.reshape(x, (-1, width), out_sharding=out)


def as_auto(tree):
  """Concrete arrays sharded over explicit mesh axes moved to the same mesh with automatic axes.

  Whole-layer computations outside `sparsify` (post-training pruning) then
  run partitioned by GSPMD, without sharding-in-types rules on every op.
  """
  def one(x):
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh) or not any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return x
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    return jax.device_put(x, NamedSharding(auto, sharding.spec))
  return jax.tree.map(one, tree, is_leaf=pytree.is_none)
