"""Sparse fine-tuning: a trainable sparse delta over frozen params, and merging deltas.

`sparse_delta(inner, selector)` is an optax transformation. Its state holds,
per fine-tuned leaf, a delta of a fixed budget of entries as (flat indices,
values) and the inner optimizer's state over those values only, so memory is
proportional to the trainable entries; the dense gradient at a leaf is the
one transient dense quantity. Its updates are dense differences: after
``params = optax.apply_updates(params, updates)`` the params are exactly
``base + delta``, so it drops into any training loop (`optax.chain`,
`inject_hyperparams`, `nnx.Optimizer`) like `sj.sparsify`. A `Selector`
(SpIEL, LT-SFT, S2FT, fixed indices) chooses the support and may move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax._src import _checks
from sparsejax._src import pytree
from sparsejax._src import sparsify as sparsify_lib
from sparsejax._src import topk

PyTree = Any


class SparseDelta(NamedTuple):
  """The delta of one leaf: ``leaf.reshape(-1)[indices] += values``, plus ``a @ b``.

  Attributes:
    indices: int32[k]: distinct flat indices into the leaf.
    values: float32[k].
    a, b: float32[m, rank] and [rank, n], a low-rank term added to the leaf
      viewed as [m, n] (its last axis is n), or None (`sparse_delta`'s
      ``rank=0``).
  """

  indices: jax.Array
  values: jax.Array
  a: jax.Array | None = None
  b: jax.Array | None = None


class Selector(NamedTuple):
  """How a sparse delta chooses its support (its indices) and moves it.

  Trees passed to the functions hold None at leaves that are not
  fine-tuned.

  Attributes:
    init: ``init(params, allowed) -> (indices, state)``: int32[k] distinct
      flat indices per leaf (a budget fixed by the leaf's shape) among the
      `allowed` entries (a bool array per leaf, or None: all), and the
      selector's own state.
    update: ``update(deltas, grads, allowed, state, step) -> (indices,
      state)`` or None for a fixed support: the new indices, with entries
      that stay in the same slots (a slot whose index changes restarts at 0
      with zero optimizer state). `grads` are the raw dense gradients.
    should_update: ``should_update(step) -> bool`` (`sj.update_steps`).
  """

  init: Callable[[PyTree, PyTree], tuple[PyTree, Any]]
  update: Callable[[PyTree, PyTree, PyTree, Any, jax.Array], tuple[PyTree, Any]] | None
  should_update: Callable[[jax.Array], jax.Array]


class SparseDeltaState(NamedTuple):
  """State of `sparse_delta`.

  Attributes:
    count: int32 number of `update` calls so far.
    delta: a `SparseDelta` per fine-tuned leaf, None elsewhere.
    inner_state: the inner optimizer's state over the delta's values.
    selector_state: the selector's own state.
  """

  count: jax.Array
  delta: PyTree
  inner_state: optax.OptState
  selector_state: Any


def _is_delta(x) -> bool:
  return isinstance(x, SparseDelta) or x is None


def _map(fn, delta, *trees):
  """``fn(d, *leaves)`` at each fine-tuned leaf of `delta`, None at the others."""
  return jax.tree.map(lambda d, *xs: None if d is None else fn(d, *xs), delta, *trees,
                      is_leaf=_is_delta)


def _allowed(params, flags, sparse_base):
  """Entries a delta may hold: every one, or the base's nonzeros (None where not tuned)."""
  leaves, treedef = pytree.flatten(params)
  out = [(jnp.reshape(pytree.unwrap(p), -1) != 0) if f and sparse_base else None
         for (_, p), f in zip(leaves, flags)]
  return jax.tree.unflatten(treedef, out)


def _restrict(tree, flags):
  leaves, treedef = pytree.flatten(tree)
  return jax.tree.unflatten(treedef, [pytree.unwrap(x) if f else None
                                      for (_, x), f in zip(leaves, flags)])


def sparse_delta(inner: optax.GradientTransformation, selector: Selector, *,
                 where: pytree.Where | str | Sequence[str] | None = None,
                 sparse_base: bool = False, rank: int = 0,
                 key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
  """Fine-tunes a sparse delta over frozen params with `inner`.

  Leaves that `where` selects get a delta of the selector's budget; every
  other leaf is frozen (zero updates). With ``sparse_base=True`` the base is
  a pruned model: its exactly-zero entries are never in a delta, so the
  fine-tuned params and every merge of deltas keep its masks exactly.

  Args:
    inner: the optimizer of the delta's values (any optax transformation).
    selector: a `Selector`: `spiel`, `lt_sft`, `s2ft` or `fixed`.
    where: which leaves to fine-tune, as in `sj.sparsify` (default: floating
      leaves with ndim >= 2).
    sparse_base: keep the base's zeros at zero.
    rank: with ``rank > 0`` each fine-tuned leaf's delta also has a low-rank
      term ``a @ b`` (sparse plus low-rank: DSEE, Chen et al. 2021,
      arXiv:2111.00160; SLTrain, Han et al. 2024, arXiv:2406.02214), `a`
      random (scaled ``1/sqrt(m)``) and `b` zero, so the delta starts at 0.
      It writes every entry, so it cannot keep a sparse base's zeros.
    key: for the low-rank term's `a` (needed when ``rank > 0``).

  Returns:
    an `optax.GradientTransformationExtraArgs` whose state is a
    `SparseDeltaState`; its `update` requires `params`.

  Example:
    >>> tx = sj.finetune.sparse_delta(optax.adamw(1e-3), sj.finetune.spiel(
    ...     0.03, update_every=50, key=jax.random.key(0)))
    >>> state = tx.init(base)
    >>> updates, state = tx.update(grads, state, params)      # params = base + delta
    >>> params = optax.apply_updates(params, updates)
    >>> merged = sj.finetune.merge(base, sj.finetune.get_delta(state))  # == params
  """
  if not isinstance(selector, Selector):
    raise ValueError(f"selector must be a sj.finetune.Selector (e.g. sj.finetune.spiel(0.03, "
                     f"...)), got {type(selector).__name__}")
  if not isinstance(sparse_base, bool):
    raise ValueError(f"sparse_base must be a Python bool, got {sparse_base!r}")
  _checks.static_int("rank", rank, minimum=0)
  if rank and sparse_base:
    raise ValueError("rank > 0 adds a low-rank term, which writes every entry: it cannot keep "
                     "a sparse base's zeros (sparse_base=True); use rank=0 there")
  if rank:
    _checks.key(key)
  inner = optax.with_extra_args_support(inner)

  def init(params):
    flags = pytree.where_flags(params, where)
    tuned = _restrict(params, flags)
    indices, selector_state = selector.init(tuned, _allowed(params, flags, sparse_base))
    leaves = jax.tree.leaves(tuned)
    keys = iter(jax.random.split(key, max(len(leaves), 1)) if rank else [None] * len(leaves))

    def start(i, p):
      if i is None:
        return None
      d = SparseDelta(jnp.asarray(i, jnp.int32), jnp.zeros(jnp.shape(i), jnp.float32))
      if not rank:
        return d
      m, n = p.size // p.shape[-1], p.shape[-1]
      a = jax.random.normal(next(keys), (m, rank), jnp.float32) / m ** 0.5
      return d._replace(a=a, b=jnp.zeros((rank, n), jnp.float32))

    delta = jax.tree.map(start, indices, tuned, is_leaf=pytree.is_none)
    return SparseDeltaState(jnp.zeros((), jnp.int32), delta, inner.init(_trained(delta)),
                            selector_state)

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sparse_delta's update needs params (the base plus the delta)")
    delta = state.delta
    leaf_grads = _map(lambda d, g: pytree.unwrap(g), delta, grads)
    values = _trained(delta)
    picked = _map(_gathered, delta, leaf_grads)
    if sparse_base:  # a slot on a zero of the base that holds nothing is frozen at zero
      live = _map(lambda d, p: (jnp.reshape(pytree.unwrap(p), -1)[d.indices] != 0)
                  | (d.values != 0), delta, params)
      picked = _map(lambda d, g, ok: g._replace(values=jnp.where(ok, g.values, 0.0)), delta,
                    picked, live)
    steps, inner_state = inner.update(picked, state.inner_state, values, **extra_args)
    new = _map(lambda d, u: d._replace(values=d.values + u.values, a=_add(d.a, u.a),
                                       b=_add(d.b, u.b)), delta, steps)
    if sparse_base:
      new = _map(lambda d, ok: d._replace(values=jnp.where(ok, d.values, 0.0)), new, live)
    step = state.count + 1
    selector_state = state.selector_state
    if selector.update is not None:
      # The base's zeros stay out: entries that are zero now and not in the delta.
      allowed = _map(lambda d, p: (jnp.reshape(pytree.unwrap(p), -1) != 0).at[d.indices].set(
          True) if sparse_base else None, delta, params)

      def move(args):
        new, inner_state, selector_state = args
        indices, selector_state = selector.update(new, leaf_grads, allowed, selector_state, step)
        kept = _map(lambda d, i: d.indices == i, new, indices)
        new = _map(lambda d, i, k: d._replace(indices=i, values=jnp.where(k, d.values, 0.0)),
                   new, indices, kept)
        keep = _map(lambda d, k: SparseDelta(None, k, None if d.a is None else True,
                                             None if d.b is None else True), new, kept)
        inner_state = sparsify_lib.zero_inactive(inner_state, values, keep)
        return new, inner_state, selector_state

      new, inner_state, selector_state = jax.lax.cond(
          selector.should_update(step), move, lambda args: args,
          (new, inner_state, selector_state))
    updates = jax.tree.map(
        lambda old, d, g: jnp.zeros_like(g) if old is None else (
            _dense(jnp.shape(g), d) - _dense(jnp.shape(g), old)).astype(jnp.result_type(g)),
        delta, new, grads, is_leaf=_is_delta)
    return updates, SparseDeltaState(step, new, inner_state, selector_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _trained(delta):
  """What the inner optimizer trains: each delta without its indices."""
  return _map(lambda d: d._replace(indices=None), delta)


def _gathered(d: SparseDelta, g: jax.Array) -> SparseDelta:
  """The gradient of a delta's trained parts from the dense gradient `g` of its leaf."""
  g = g.astype(jnp.float32)
  values = jnp.reshape(g, -1)[d.indices]
  if d.a is None:
    return SparseDelta(None, values)
  g = g.reshape(d.a.shape[0], d.b.shape[1])
  return SparseDelta(None, values, g @ d.b.T, d.a.T @ g)


def _add(x, u):
  return None if x is None else x + u


def _dense(shape, delta: SparseDelta) -> jax.Array:
  size = 1
  for s in shape:
    size *= s
  out = jnp.zeros((size,), jnp.float32).at[delta.indices].add(delta.values).reshape(shape)
  return out if delta.a is None else out + (delta.a @ delta.b).reshape(shape)


def get_delta(state: optax.OptState) -> PyTree:
  """The delta (a `SparseDelta` per fine-tuned leaf, None elsewhere) in an optimizer state."""
  is_state = lambda x: isinstance(x, SparseDeltaState)  # noqa: E731
  found = [s.delta for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]
  if len(found) != 1:
    raise ValueError(f"expected one sparse_delta state in the optimizer state, found "
                     f"{len(found)}")
  return found[0]


def merge(base: PyTree, *deltas: PyTree, weights=None) -> PyTree:
  """``base + sum_i weights[i] * deltas[i]``: an exported model, or several task deltas merged.

  Entries no delta holds keep the base's values exactly, so a sparse base
  (fine-tuned with ``sparse_base=True``) keeps its zeros.

  Args:
    base: the params the deltas were trained over.
    *deltas: from `get_delta`, each with the base's tree structure.
    weights: one float per delta (default 1 each: the sum).

  Example:
    >>> model = sj.finetune.merge(base, sj.finetune.get_delta(state))
    >>> both = sj.finetune.merge(base, delta_a, delta_b, weights=(0.5, 0.5))
  """
  weights = (1.0,) * len(deltas) if weights is None else tuple(weights)
  if len(weights) != len(deltas):
    raise ValueError(f"weights has {len(weights)} entries for {len(deltas)} deltas")
  leaves, treedef = pytree.flatten(base)
  out = [p for _, p in leaves]
  for n, (delta, w) in enumerate(zip(deltas, weights)):
    parts = jax.tree.leaves(delta, is_leaf=_is_delta)
    if len(parts) != len(leaves):
      raise ValueError(f"deltas[{n}] has {len(parts)} leaves, base has {len(leaves)}: a delta "
                       f"from another model?")
    for i, ((path, p), d) in enumerate(zip(leaves, parts)):
      if d is None:
        continue
      if not isinstance(d, SparseDelta):
        raise ValueError(f"deltas[{n}] at {pytree.describe(path)} is {type(d).__name__}, "
                         f"expected a SparseDelta or None")
      size = int(jnp.size(p))
      if d.indices.ndim != 1 or (_checks.is_concrete(d.indices) and d.indices.size and (
          int(d.indices.max()) >= size or int(d.indices.min()) < 0)):
        raise ValueError(f"deltas[{n}] at {pytree.describe(path)} indexes outside the leaf of "
                         f"{size} entries (shape {jnp.shape(p)}): a delta from another model?")
      out[i] = (out[i] + w * _dense(jnp.shape(p), d)).astype(jnp.result_type(p))
  return jax.tree.unflatten(treedef, out)


def state_bytes(state: optax.OptState) -> int:
  """Bytes of every array in an optimizer state."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


def budget(density: float, size: int) -> int:
  """Entries of a leaf of `size` entries a delta of `density` holds (at least 1)."""
  return max(1, round(density * size))


def top_indices(scores: jax.Array, k: int) -> jax.Array:
  """int32[k]: the flat indices of the `k` largest `scores` (exact top-k, ascending)."""
  chosen = topk.topk_mask(jnp.reshape(scores, -1), k)
  return jnp.nonzero(chosen, size=k, fill_value=0)[0].astype(jnp.int32)

