"""`sparsify`: any optax optimizer, trained sparse, with nothing else in the loop.

The wrapper owns the masks. On every `update` it

1. changes the masks when the method says so, under `lax.cond` on its own
   step count (state shapes never change, so nothing recompiles);
2. zeroes the inner optimizer's per-parameter state (momentum, Adam moments)
   wherever an entry is inactive, using `optax.tree_utils.tree_map_params`,
   so this works for any optax optimizer and a regrown entry starts from zero;
3. feeds the inner optimizer gradients with the pruned entries zeroed;
4. returns updates that take every pruned entry to exactly zero: ``-param``
   where the mask is False, so ``optax.apply_updates`` lands on 0.0 exactly,
   whatever the inner optimizer did (momentum, weight decay, ...). Only a
   NaN or infinite weight cannot be zeroed by an update; `apply_masks` can.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import optax

from sparsejax._src import masks as masks_lib
from sparsejax._src import pytree
from sparsejax._src import sharding

PyTree = Any

NO_PARAMS_MSG = (
    "sparsify needs the current params: call tx.update(grads, state, params). "
    "They decide which entries are pruned and let the update set them to exactly 0.")


class SparsityMethod(NamedTuple):
  """A sparsity method: how masks start and when and how they change.

  All three functions are traced. Trees passed to them are restricted to the
  sparsified leaves: ``None`` at leaves that stay dense, so ``jax.tree.map``
  over masks, params and grads together just works.

  Attributes:
    init: ``init(params) -> (masks, state)``: the first masks (bool arrays of the
      params' shapes) and the method's own state (any pytree, or None).
    update: ``update(masks, state, params, grads, step) -> (masks, state)``: new
      masks with the same shapes and dtypes, called under `lax.cond` only when
      ``should_update(step)``. `grads` are the raw (unmasked) gradients.
    should_update: ``should_update(step) -> bool``: whether `update` runs at this
      step (the wrapper's count: 0 at the first `update` call).
    dense_params: False (the default) for methods that keep params exactly
      sparse: the wrapper zeroes pruned weights, their gradients and their
      optimizer state. True for straight-through methods (`n_m`): params stay
      dense, the forward pass applies the masks with
      ``apply_masks(..., ste=True)`` and `sparse_params` exports the result.
    estimate_grads: for dense-params methods, ``estimate_grads(grads, masks,
      params, step) -> grads`` turns the straight-through gradient into the
      estimator's before the inner optimizer sees it.

  Example:
    A method that prunes the entries with the smallest gradient every 50
    steps, at a fixed sparsity::

      def gradient_pruning(sparsity):
        def init(params):
          return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params), None

        def update(masks, state, params, grads, step):
          scores = jax.tree.map(lambda g, m: jnp.where(m, jnp.abs(g), -jnp.inf),
                                grads, masks)
          return sj.topk_masks(scores, sparsity), state

        return sj.SparsityMethod(init, update, lambda step: step % 50 == 0)
  """

  init: Callable[[PyTree], tuple[PyTree, Any]]
  update: Callable[[PyTree, Any, PyTree, PyTree, jax.Array], tuple[PyTree, Any]]
  should_update: Callable[[jax.Array], jax.Array]
  dense_params: bool = False
  estimate_grads: Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree] | None = None


class SparsifyState(NamedTuple):
  """State of `sparsify`.

  Attributes:
    count: int32 number of `update` calls so far.
    masks: the masks pytree (bool per sparsified leaf, None per dense leaf).
      The field name is unique, so ``optax.tree.get(state, "masks")`` finds it.
    inner_state: the wrapped optimizer's state.
    method_state: the sparsity method's own state.
  """

  count: jax.Array
  masks: PyTree
  inner_state: optax.OptState
  method_state: Any


def _check_method_masks(new: PyTree, old: PyTree, when: str) -> None:
  new_leaves, new_def = pytree.flatten(new)
  old_leaves, old_def = pytree.flatten(old)
  if new_def != old_def:
    raise ValueError(
        f"the sparsity method's {when} returned masks with structure {new_def}; "
        f"expected {old_def} (bool arrays at sparsified leaves, None at dense ones)")
  for (path, n), (_, o) in zip(new_leaves, old_leaves):
    if n is None:
      continue
    if jnp.shape(n) != jnp.shape(o) or jnp.result_type(n) != jnp.bool_:
      raise ValueError(
          f"the sparsity method's {when} returned {pytree.describe(path, 'masks')} with "
          f"shape {jnp.shape(n)} and dtype {jnp.result_type(n)}; expected shape "
          f"{jnp.shape(o)} and dtype bool")


def _reset_inner_state(inner: optax.GradientTransformation, inner_state: optax.OptState,
                       keep: PyTree) -> optax.OptState:
  """Zeroes param-shaped inner state where `keep` is False (True at dense leaves)."""

  masked_node = lambda x: isinstance(x, optax.transforms.MaskedNode)

  def reset(s, k):
    # MaskedNode marks leaves an optax.masked / optax.partition branch skips.
    if masked_node(s) or k is True or jnp.shape(s) != jnp.shape(k):
      return s
    return jnp.where(k, s, jnp.zeros((), s.dtype))

  return optax.tree_utils.tree_map_params(inner, reset, inner_state, keep, is_leaf=masked_node)


def sparsify(
    inner: optax.GradientTransformation,
    method: SparsityMethod,
    *,
    where: pytree.Where | str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Trains with `inner` while `method` keeps the params sparse.

  After every ``params = optax.apply_updates(params, updates)`` the pruned
  entries are exactly zero and each sparsified leaf has exactly the number of
  nonzero-allowed entries the method's schedule gives. Only the leaves that
  `where` selects are sparsified; the others are trained dense.

  Args:
    inner: any optax transformation (a chain, `inject_hyperparams`, ...).
    method: a `SparsityMethod` such as `magnitude`, `snip` or `static_random`.
    where: which leaves to sparsify, decided once at `init`: a callable
      ``(path, leaf) -> bool``, a path pattern (regex searched in
      ``"a/b/kernel"``) or a sequence of them, or None for floating leaves with
      ndim >= 2. Use `nnx_filter` for flax nnx filters.

  Returns:
    an `optax.GradientTransformationExtraArgs` whose state is a
    `SparsifyState`. Its `update` requires `params`.

  Example:
    >>> method = sj.magnitude(sj.polynomial_schedule(0.0, 0.9, 100, 1000), update_every=100)
    >>> tx = sj.sparsify(optax.adam(1e-3), method)
    >>> state = tx.init(params)
    >>> params = sj.apply_masks(params, sj.get_masks(state))
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  if not isinstance(method, SparsityMethod):
    raise ValueError(
        f"method must be a sj.SparsityMethod (e.g. sj.magnitude(0.9)), got {type(method).__name__}")
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise ValueError(
        f"inner must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got {inner!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    template = pytree.full_masks(params, where)
    masks, method_state = method.init(sharding.gathered(pytree.restrict(template, params)))
    _check_method_masks(masks, template, "init")
    masks = sharding.like(masks, pytree.restrict(masks, params))
    return SparsifyState(
        count=jnp.zeros([], jnp.int32),
        masks=masks,
        inner_state=inner.init(params),
        method_state=method_state)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    pytree.check_masks(state.masks, params)
    pytree.check_masks(state.masks, updates, root="updates")
    step = state.count

    def change(operand):
      masks, old_state = operand
      new_masks, method_state = method.update(
          sharding.gathered(masks), old_state, sharding.gathered(pytree.restrict(masks, params)),
          sharding.gathered(pytree.restrict(masks, updates)), step)
      _check_method_masks(new_masks, masks, "update")
      # Both branches of the cond must agree in sharding too.
      return sharding.like(new_masks, masks), sharding.like(method_state, old_state)

    masks, method_state = lax.cond(
        jnp.asarray(method.should_update(step), jnp.bool_), change, lambda operand: operand,
        (state.masks, state.method_state))

    if method.dense_params:
      # Straight-through training: every weight trains; the estimator decides
      # what pruned weights learn.
      if method.estimate_grads is not None:
        estimated = method.estimate_grads(pytree.restrict(masks, updates), masks,
                                          pytree.restrict(masks, params), step)
        updates = jax.tree.map(lambda m, g, e: g if m is None else e, masks, updates,
                               estimated, is_leaf=pytree.is_none)
      new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
      return new_updates, SparsifyState(
          count=optax.safe_increment(step), masks=masks, inner_state=inner_state,
          method_state=method_state)

    # Inactive entries hold zero optimizer state, so entries grown later
    # start from zero. (Reading only the new masks lets XLA update the
    # masks in place instead of copying them.)
    keep = jax.tree.map(lambda m, p: (None if p is None else True) if m is None else m,
                        masks, params, is_leaf=pytree.is_none)
    inner_state = _reset_inner_state(inner, state.inner_state, keep)
    grads = jax.tree.map(
        lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype)),
        masks, updates, is_leaf=pytree.is_none)
    new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)

    def land_on_zero(m, u, p):
      if m is None:
        return u
      dtype = jnp.promote_types(u.dtype, p.dtype)
      return jnp.where(m, u.astype(dtype), -p.astype(dtype))

    new_updates = jax.tree.map(land_on_zero, masks, new_updates, params, is_leaf=pytree.is_none)
    return new_updates, SparsifyState(
        count=optax.safe_increment(step),
        masks=masks,
        inner_state=inner_state,
        method_state=method_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sparse_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """The sparse model: `params` with the masks in `opt_state` applied.

  For methods that keep params exactly sparse this returns them unchanged in
  value; for straight-through methods (`n_m`), whose params stay dense, it
  exports the trained sparse weights.

  Example:
    >>> final = sj.sparse_params(params, opt_state)
  """
  return masks_lib.apply_masks(params, get_masks(opt_state))


def get_masks(opt_state: optax.OptState) -> PyTree:
  """The masks inside an optimizer state, wherever `sparsify` put them.

  Works for a plain `sparsify` state and for one nested in `optax.chain`,
  `optax.inject_hyperparams` or `nnx.Optimizer(...).opt_state`; nnx wrappers
  are removed, so the result pairs with plain params.

  Raises:
    ValueError: if the state holds no `SparsifyState`, or more than one.

  Example:
    >>> masks = sj.get_masks(opt_state)
  """
  is_state = lambda x: isinstance(x, SparsifyState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one SparsifyState in the optimizer state, found {len(found)}; "
        "the state must come from an optimizer built with sj.sparsify")
  return jax.tree.map(pytree.unwrap, found[0].masks, is_leaf=pytree.is_variable)
