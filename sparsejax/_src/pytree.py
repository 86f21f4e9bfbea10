"""Leaf paths, `where` filters and the masks pytree convention.

A masks pytree has the structure of the params it belongs to. A sparsified
leaf holds a boolean array of the param's shape (``True`` = kept); a leaf that
stays dense holds ``None``. Because ``None`` is an empty pytree node, trees
"restricted" to the sparsified leaves (params with ``None`` at dense leaves)
map together with masks under a plain ``jax.tree.map``.

Flax nnx ``Variable`` objects (as found in ``nnx.state(model)``) are treated as
leaves here, so paths never end in the Variable's ``.value``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Path = tuple[Any, ...]
Where = Callable[[Path, Any], bool]


def is_none(x: Any) -> bool:
  return x is None


def is_variable(x: Any) -> bool:
  """Whether `x` is a flax nnx Variable (without importing flax)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def unwrap(x: Any) -> Any:
  """The array held by an nnx Variable, or `x` itself."""
  return x.get_value() if is_variable(x) else x


def path_keys(path: Path) -> tuple[Any, ...]:
  """Plain keys of a JAX key path: dict keys, attribute names, indices."""
  out = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(getattr(entry, attr))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def path_str(path: Path) -> str:
  """'/'-joined path, as matched by path patterns: ``"dense/kernel"``."""
  return "/".join(str(k) for k in path_keys(path))


def describe(path: Path, root: str = "params") -> str:
  """A leaf path as Python would index it: ``params['dense']['kernel']``."""
  return root + jax.tree_util.keystr(path)


def flatten(tree: PyTree) -> tuple[list[tuple[Path, Any]], Any]:
  """Leaves with paths; nnx Variables kept whole and ``None`` kept as a leaf.

  Treating ``None`` as a leaf gives params and their masks (``None`` at dense
  leaves) the same structure.
  """
  return jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or is_variable(x))


def default_where(path: Path, leaf: Any) -> bool:
  """Floating leaves with ndim >= 2: kernels, embeddings, conv filters."""
  del path
  leaf = unwrap(leaf)
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and jnp.ndim(leaf) >= 2


def compile_pattern(pattern: str, argument: str) -> re.Pattern:
  """`re.compile` with a ValueError that names the argument."""
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{argument}: {pattern!r} is not a valid regular expression: {e}") from e


def path_pattern(*patterns: str) -> Where:
  """A `where` filter: leaves whose path matches any regex pattern.

  Paths are the keys joined by ``/`` (``"Dense_0/kernel"``, ``"layers/0/w"``);
  patterns are matched with `re.search`, so ``"kernel"`` matches every path
  that contains it and ``"^encoder/"`` only paths under ``encoder``.

  Example:
    >>> where = sj.path_pattern("kernel$", "embedding")
  """
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(f"path_pattern takes one or more regex strings, got {patterns!r}")
  compiled = [compile_pattern(p, "where") for p in patterns]

  def where(path: Path, leaf: Any) -> bool:
    del leaf
    s = path_str(path)
    return any(c.search(s) for c in compiled)

  where.patterns = patterns
  return where


def nnx_filter(nnx_filter_: Any) -> Where:
  """A `where` filter from a flax nnx filter, e.g. ``nnx.PathContains("kernel")``.

  The filter sees the path as a tuple of plain keys and the leaf as found in
  the params (an nnx ``Variable`` for ``nnx.state(model)``), so type filters such
  as ``nnx.Param`` work too.

  Example:
    >>> tx = sj.sparsify(optax.adam(1e-3), method,
    ...                  where=sj.nnx_filter(nnx.PathContains("kernel")))
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  predicate = nnx.filterlib.to_predicate(nnx_filter_)

  def where(path: Path, leaf: Any) -> bool:
    return bool(predicate(path_keys(path), leaf))

  return where


def as_where(where: Where | str | Sequence[str] | None) -> Where:
  """Turns the `where` argument (None, callable, pattern or patterns) into a filter."""
  if where is None:
    return default_where
  if isinstance(where, type) or type(where).__module__.startswith("flax."):
    raise ValueError(
        f"where={where!r} is a flax nnx filter, which sees nnx paths and Variables: pass "
        f"where=sj.nnx_filter({getattr(where, '__name__', 'filter')}) instead")
  if isinstance(where, str):
    return path_pattern(where)
  if isinstance(where, (list, tuple)):
    return path_pattern(*where)
  if callable(where):
    return where
  raise ValueError(
      "where must be None, a callable (path, leaf) -> bool, a path pattern "
      f"or a sequence of path patterns, got {where!r}")


def where_flags(params: PyTree, where: Where | str | Sequence[str] | None) -> list[bool]:
  """Evaluates `where` on every leaf of `params`; raises if it selects nothing."""
  where = as_where(where)
  leaves, _ = flatten(params)
  if not leaves:
    raise ValueError("params has no leaves: there is nothing to sparsify.")
  flags = []
  for path, leaf in leaves:
    try:
      flag = leaf is not None and bool(where(path, leaf))
    except (TypeError, ValueError) as e:
      raise ValueError(f"where must return a bool for each leaf; for {describe(path)} it "
                       f"failed: {e}") from e
    if flag and not jnp.issubdtype(jnp.result_type(unwrap(leaf)), jnp.floating):
      raise ValueError(
          f"where selected {describe(path)} of dtype {jnp.result_type(unwrap(leaf))}; "
          "only floating-point leaves can be sparsified.")
    if flag and jnp.ndim(unwrap(leaf)) == 0:
      raise ValueError(
          f"where selected {describe(path)}, a scalar: a 0-d leaf has nothing to prune. "
          "Leave it out of `where` (the default selects leaves with ndim >= 2).")
    flags.append(flag)
  if not any(flags):
    listing = ", ".join(path_str(p) or "<root>" for p, _ in leaves[:8])
    more = f" (and {len(leaves) - 8} more)" if len(leaves) > 8 else ""
    raise ValueError(
        f"where matches no leaf of params, so nothing would be sparsified. "
        f"Leaf paths: {listing}{more}. The default selects floating leaves "
        "with ndim >= 2; pass where= a path pattern or a callable (path, leaf) -> bool.")
  return flags


def full_masks(params: PyTree, where: Where | str | Sequence[str] | None = None) -> PyTree:
  """All-True masks for the leaves `where` selects, ``None`` for the others."""
  leaves, treedef = flatten(params)
  flags = where_flags(params, where)
  masks = [jnp.ones(jnp.shape(unwrap(leaf)), jnp.bool_) if flag else None
           for (_, leaf), flag in zip(leaves, flags)]
  return jax.tree_util.tree_unflatten(treedef, masks)


def restrict(masks: PyTree, tree: PyTree) -> PyTree:
  """`tree` with ``None`` at the leaves where `masks` is ``None`` (dense)."""
  return jax.tree.map(lambda m, x: None if m is None else unwrap(x), masks, tree,
                      is_leaf=is_none)


def check_masks(masks: PyTree, params: PyTree, root: str = "params") -> None:
  """Raises ValueError unless `masks` pairs with `params` (structure, shapes, dtype)."""
  m_leaves, m_def = flatten(masks)
  p_leaves, p_def = flatten(params)
  if m_def != p_def:
    m_paths = {path_str(p) for p, _ in m_leaves}
    p_paths = {path_str(p) for p, _ in p_leaves}
    missing = sorted(p_paths - m_paths)
    extra = sorted(m_paths - p_paths)
    detail = []
    if missing:
      detail.append(f"leaves missing from masks: {missing[:5]}")
    if extra:
      detail.append(f"leaves in masks but not in {root}: {extra[:5]}")
    if not detail:
      detail.append(f"masks structure {m_def} != {root} structure {p_def}")
    raise ValueError(
        f"masks do not have the structure of {root}: " + "; ".join(detail) +
        ". A masks tree has the params' structure with a bool array per "
        "sparsified leaf and None per dense leaf.")
  for (path, m), (_, p) in zip(m_leaves, p_leaves):
    if m is None:
      continue
    m = unwrap(m)
    if p is None:
      raise ValueError(
          f"{describe(path, root)} is None but the leaf is sparsified: expected an array of "
          f"shape {jnp.shape(m)}. Give it a zero gradient, or leave it out of `where`.")
    p_shape = jnp.shape(unwrap(p))
    if jnp.shape(m) != p_shape:
      raise ValueError(
          f"{describe(path, root)}: mask shape {jnp.shape(m)} != param shape {p_shape}")
    if jnp.result_type(m) != jnp.bool_:
      raise ValueError(
          f"{describe(path, root)}: mask dtype {jnp.result_type(m)} != bool")
