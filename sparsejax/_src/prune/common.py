"""What every post-training rule shares: patterns, per-group selection and the layer loop.

A rule sees each calibrated kernel as a matrix ``W`` [d_in, d_out] (see
`calibration.Layer`) and returns its mask (and, for SparseGPT, new weights).
Counts are exact:

* ``pattern=None``: unstructured. With ``group="output"`` (the default, as in
  Wanda) every output keeps ``round((1 - sparsity) * d_in)`` inputs; with
  ``group="layer"`` the layer keeps ``round((1 - sparsity) * d_in * d_out)``.
* ``pattern=(n, m)``: n kept in every m consecutive inputs of each output
  (N:M along d_in, the axis -2 of a Dense kernel, as everywhere in sparsejax);
  `sparsity` is then implied and not given.
* ``pattern=sj.Block((bi, bo))``: whole [bi, bo] tiles of the matrix, counted
  in tiles per column of tiles ("output") or per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src import _checks
from sparsejax._src import calibration as calibration_lib
from sparsejax._src import distributions
from sparsejax._src import granularity as granularities
from sparsejax._src import n_m_masks
from sparsejax._src import pytree
from sparsejax._src import selection
from sparsejax._src import sharding
from sparsejax._src import topk

GROUPS = ("output", "layer")


def check_rule(owner: str, sparsity: Any, pattern: Any, group: str) -> Any:
  """Validates sparsity, pattern and group; returns the pattern normalized (tuple or Block)."""
  _checks.choice("group", group, GROUPS)
  if pattern is None or isinstance(pattern, granularities.Block):
    if sparsity is None:
      raise ValueError(f"{owner}: give sparsity= (a float in [0, 1), or per-layer sparsities "
                       "from sj.prune.owl), or an N:M pattern=(n, m)")
    if isinstance(pattern, granularities.Block) and len(pattern.block_shape) != 2:
      raise ValueError(f"{owner}: pattern={pattern} must tile the [d_in, d_out] matrix: "
                       "give a 2-D block_shape")
    calibration_lib.check_sparsity(sparsity)
    return pattern
  if isinstance(pattern, (tuple, list)) and len(pattern) == 2:
    n, m = pattern
    _checks.n_m(n, m)
    if not _checks.is_int(n):
      raise ValueError(f"{owner}: pattern={pattern!r} needs a fixed integer n")
    if sparsity is not None:
      raise ValueError(f"{owner}: pattern={tuple(pattern)} sets the sparsity ({1 - n / m:g}); "
                       f"leave sparsity= out (got {sparsity!r})")
    return int(n), int(m)
  raise ValueError(f"{owner}: pattern={pattern!r} must be None (unstructured), an N:M pair "
                   "(n, m) or an sj.Block((bi, bo))")



def check_layer_shapes(owner: str, layer: calibration_lib.Layer, pattern: Any) -> None:
  if isinstance(pattern, tuple) and layer.d_in % pattern[1]:
    raise ValueError(f"{owner}: N:M {pattern[0]}:{pattern[1]} needs m to divide d_in of "
                     f"{layer.path} (d_in = {layer.d_in}, kernel {layer.kernel_shape}); leave "
                     "the layer out of calibrate(where=...) or choose another m")
  if isinstance(pattern, granularities.Block):
    bi, bo = pattern.block_shape
    if layer.d_in % bi or layer.d_out % bo:
      raise ValueError(f"{owner}: {pattern} does not tile {layer.path} as a [d_in, d_out] = "
                       f"[{layer.d_in}, {layer.d_out}] matrix")


def select(scores: jax.Array, sparsity: jax.Array, pattern: Any, group: str) -> jax.Array:
  """Mask [d_in, d_out] keeping the highest `scores` with the rule's exact counts."""
  if isinstance(pattern, tuple):
    return n_m_masks.n_m_mask(scores, pattern[0], pattern[1], axis=0)
  rows, size = (pattern.units(scores.shape) if isinstance(pattern, granularities.Block)
                else scores.shape)
  units = rows if group == "output" else rows * size
  return select_count(scores, distributions.kept(1.0 - sparsity, units), pattern, group)


def select_count(scores: jax.Array, k: jax.Array, pattern: Any, group: str) -> jax.Array:
  """Mask keeping `k` units (tiles for a Block): per output column of units, or in the layer."""
  block = pattern if isinstance(pattern, granularities.Block) else None
  units = block.pool(scores) if block else scores
  kept = selection.topk_columns(units, k) if group == "output" else topk.topk_mask(units, k)
  return block.expand(kept, scores.shape) if block else kept






def run(owner: str, params: Any, calibration: calibration_lib.Calibration,
        prune_layer: Callable[..., tuple[jax.Array, jax.Array | None]], *,
        sparsity: Any, pattern: Any, sequential: bool,
        initial_masks: Any = None) -> tuple[Any, Any]:
  """Prunes every calibrated layer; returns (masks, params).

  ``prune_layer(layer, w, stats, sparsity, mask) -> (mask, w or None)`` gets
  the kernel as a float32 [d_in, d_out] matrix. With `sequential`, each group
  of layers (those sharing an input) is recalibrated on the calibration
  batches with every earlier group already pruned (and updated).
  """
  if not isinstance(sequential, bool):
    raise ValueError(f"{owner}: sequential={sequential!r} must be a bool")
  params = calibration_lib.as_params(params)
  leaves, treedef = pytree.flatten(params)
  index = {pytree.path_str(p): i for i, (p, _) in enumerate(leaves)}
  layers = calibration.layers
  for layer in layers:
    if layer.path not in index or leaves[index[layer.path]][1] is None:
      raise ValueError(f"{owner}: calibrated layer {layer.path} is not a leaf of params; give "
                       "the params (or model) that was calibrated")
    shape = tuple(jnp.shape(pytree.unwrap(leaves[index[layer.path]][1])))
    if shape != layer.kernel_shape:
      raise ValueError(f"{owner}: params {layer.path} has shape {shape}, but it was calibrated "
                       f"with shape {layer.kernel_shape}")
    check_layer_shapes(owner, layer, pattern)
  per_layer = calibration_lib.layer_sparsities(owner, sparsity, layers)
  start = {} if initial_masks is None else masks_by_path(owner, initial_masks, layers)
  values = [pytree.unwrap(v) for _, v in leaves]
  masks: dict[str, jax.Array] = {}

  def tree(vals):
    return jax.tree_util.tree_unflatten(
        treedef, [v.replace(x) if pytree.is_variable(v) else x
                  for (_, v), x in zip(leaves, vals)])

  one_pass = {l.path: calibration[l.path] for l in layers}
  for group in (calibration.groups if sequential else [list(layers)]):
    stats = calibration.collect(tree(values), [l.path for l in group]) if sequential else one_pass
    for layer in group:
      i = index[layer.path]
      kernel = values[i]
      # Layer by layer, with the params' sharding (automatic axes: GSPMD partitions the solve).
      w = layer.to_matrix(jnp.asarray(sharding.as_auto(kernel), jnp.float32))
      s = per_layer[layer.path]
      mask, new_w = prune_layer(layer, w, sharding.as_auto(stats[layer.path]),
                                None if s is None else jnp.float32(s),
                                sharding.as_auto(start.get(layer.path)))
      new_w = jnp.where(mask, w if new_w is None else new_w, 0.0)
      new_kernel = layer.from_matrix(new_w).astype(jnp.result_type(kernel))
      mask = layer.from_matrix(mask)
      if isinstance(kernel, jax.Array):  # results sharded like the param
        new_kernel, mask = (jax.device_put(a, kernel.sharding) for a in (new_kernel, mask))
      values[i] = new_kernel
      masks[layer.path] = mask
  mask_tree = jax.tree_util.tree_unflatten(
      treedef, [masks.get(pytree.path_str(p)) for p, _ in leaves])
  return mask_tree, tree(values)


def masks_by_path(owner: str, masks: Any, layers) -> dict[str, jax.Array]:
  """The bool mask of every calibrated layer, as [d_in, d_out] matrices."""
  found = {pytree.path_str(p): m for p, m in pytree.flatten(masks)[0]}
  out = {}
  for layer in layers:
    m = found.get(layer.path)
    if m is None:
      raise ValueError(f"{owner}: masks has no mask for calibrated layer {layer.path}")
    m = pytree.unwrap(m)
    if tuple(jnp.shape(m)) != layer.kernel_shape or jnp.result_type(m) != jnp.bool_:
      raise ValueError(f"{owner}: masks {layer.path} must be bool of shape {layer.kernel_shape}, "
                       f"got {jnp.result_type(m)} of shape {tuple(jnp.shape(m))}")
    out[layer.path] = layer.to_matrix(jnp.asarray(m))
  return out
