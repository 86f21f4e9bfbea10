"""`sparsify`: any optax optimizer, trained sparse, with nothing else in the loop.

The wrapper owns the masks and the invariants: after every update pruned
weights are exactly zero (``-param`` updates, so ``optax.apply_updates``
lands on 0.0 whatever the inner optimizer did) and the inner optimizer's
per-parameter state is exactly zero at inactive entries. Masks change after
the optimizer step, under `lax.cond` on the wrapper's own count, so state
shapes never change and nothing recompiles. Only a NaN or infinite weight
cannot be zeroed by an update; `apply_masks` can.
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
    init: ``init(params) -> (masks, state)``: the masks of step 0 (bool arrays
      of the params' shapes) and the method's own state (any pytree, or None).
    update: ``update(masks, state, params, grads, step) -> (masks, state)``:
      the masks of `step`, with the same shapes and dtypes, called under
      `lax.cond` only when ``should_update(step)``, in the `update` call that
      precedes `step`: `params` and `grads` are that call's (the weights the
      gradients were taken at, and the raw, unmasked gradients). The new
      masks take effect in that same call: only entries active in both old
      and new masks train; dropped and grown entries land on zero.
    should_update: ``should_update(step) -> bool``: whether the masks change
      for `step` (1 after the first `update` call). `sj.update_steps` is the
      rule every built-in method uses.
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
          return sj.masks_from_scores(scores, sparsity), state

        return sj.SparsityMethod(init, update, sj.update_steps(update_every=50))
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
    where = pytree.describe(path, "masks")
    if o is None and n is not None:
      raise ValueError(f"the sparsity method's {when} returned a mask at {where}, a dense leaf "
                       "(not selected by `where`): expected None there")
    if o is not None and n is None:
      raise ValueError(f"the sparsity method's {when} returned None at {where}, a sparsified "
                       f"leaf: expected a bool array of shape {jnp.shape(o)}")
    if n is None:
      continue
    if jnp.shape(n) != jnp.shape(o) or jnp.result_type(n) != jnp.bool_:
      raise ValueError(
          f"the sparsity method's {when} returned {where} with shape {jnp.shape(n)} and dtype "
          f"{jnp.result_type(n)}; expected shape {jnp.shape(o)} and dtype bool")


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.transforms.MaskedNode)


def zero_inactive(inner_state: optax.OptState, params: PyTree, keep: PyTree) -> optax.OptState:
  """Zeroes the inner state where `keep` is False, in every params-shaped subtree.

  A subtree is params-shaped when it has the params' tree structure (optax's
  per-parameter state: momenta, Adam moments, schedule-free's ``z``, L-BFGS
  memories); ``optax.masked`` and ``optax.partition`` branches hold
  `MaskedNode` at the leaves they skip. A leaf whose trailing dims are the
  param's shape (a stack of memories) is zeroed along them too. Unlike
  `optax.tree_utils.tree_map_params` this never runs the inner `init` on a
  placeholder, so label functions and line searches see real params.
  """
  params_def = jax.tree.structure(params, is_leaf=_is_masked_node)
  keep_leaves = jax.tree.leaves(keep, is_leaf=_is_masked_node)

  def reset(s, k):
    if _is_masked_node(s) or _is_masked_node(k) or k is True or not hasattr(s, "shape"):
      return s
    if s.shape[s.ndim - k.ndim:] != k.shape or s.ndim < k.ndim:
      return s
    return jnp.where(k, s, jnp.zeros((), s.dtype))

  def is_params_shaped(x):
    return jax.tree.structure(x, is_leaf=_is_masked_node) == params_def

  def reset_tree(x):
    if not is_params_shaped(x):
      return x
    leaves, treedef = jax.tree.flatten(x, is_leaf=_is_masked_node)
    return jax.tree.unflatten(treedef, [reset(s, k) for s, k in zip(leaves, keep_leaves)])

  return jax.tree.map(reset_tree, inner_state, is_leaf=is_params_shaped)


def _land_on_zero(keep: PyTree, updates: PyTree, params: PyTree) -> PyTree:
  """Updates that take every entry where `keep` is False to exactly zero: ``-param`` there."""

  def land(k, u, p):
    if k is None:
      return u
    dtype = jnp.promote_types(u.dtype, p.dtype)
    return jnp.where(k, u.astype(dtype), -p.astype(dtype))

  return jax.tree.map(land, keep, updates, params, is_leaf=pytree.is_none)


def uniform_cond(pred: jax.Array, true_fun: Callable[[Any], Any], false_fun: Callable[[Any], Any],
                 operand: Any) -> Any:
  """`lax.cond` that stays a branch under `jax.vmap` when every member takes the same one.

  `jax.vmap` turns a `lax.cond` on a batched predicate into both branches
  and a select, so an ensemble of models vmapped over one train step would
  run its mask update at every step. Here, under `vmap`, the members'
  predicates decide together: all True runs the batched `true_fun`, all
  False the batched `false_fun`, and only a mix (members at different steps)
  runs both and selects per member. The functions must take everything
  they read through `operand` (no closed-over traced values); the result
  is batched along axis 0.
  """

  @jax.custom_batching.custom_vmap
  def run(pred, operand):
    return lax.cond(pred, true_fun, false_fun, operand)

  @run.def_vmap
  def rule(axis_size, in_batched, pred, operand):
    pred_batched, operand_batched = in_batched
    axes = jax.tree.map(lambda b: 0 if b else None, operand_batched)
    batched_true = jax.vmap(true_fun, in_axes=(axes,), axis_size=axis_size)
    batched_false = jax.vmap(false_fun, in_axes=(axes,), axis_size=axis_size)
    if not pred_batched:
      out = lax.cond(pred, batched_true, batched_false, operand)
    else:
      def mixed(operand):
        pick = lambda a, b: jnp.where(pred.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
        return jax.tree.map(pick, batched_true(operand), batched_false(operand))
      out = lax.cond(jnp.all(pred), batched_true,
                     lambda o: lax.cond(jnp.any(pred), mixed, batched_false, o), operand)
    return out, jax.tree.map(lambda _: True, out)

  return run(pred, operand)


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

  One `update` call, with ``t = state.count``:

  1. if ``method.should_update(t + 1)``, the method computes the masks of
     step ``t + 1`` from this call's params and raw gradients (under
     `lax.cond`, so state shapes never change; under `jax.vmap` over an
     ensemble the branch is taken once for all members when their step
     counts agree, see `uniform_cond`; the update takes no gradient);
  2. the inner optimizer updates the entries active both before and after
     that change; the returned updates take every other entry to exactly
     zero: pruned weights, and weights grown at this step, which start
     training at the next step;
  3. the inner optimizer's per-parameter state is zeroed at the same entries
     before its update, which sees them as zero params with zero gradient,
     so nothing (weight decay included) writes into their state: for every
     inner optimizer that updates an entry from its own state, gradient and
     param only (all of optax's, schedule-free and L-BFGS included) the
     state of inactive entries stays exactly zero, and a regrown entry
     starts from zero state. (A chain that adds noise to the gradients,
     `optax.add_noise`, can leave noise there for one step; it never
     reaches the weights. Zeroing after the inner update instead would cost
     about 4x the update on CPU, because XLA then materializes the moments
     twice.)

  So ``get_masks(state)`` always holds the masks of step ``state.count``.

  Args:
    inner: any optax transformation (a chain, `inject_hyperparams`, ...).
    method: a `SparsityMethod` such as `magnitude`, `snip` or `rigl`.
    where: which leaves to sparsify, decided once at `init`: a callable
      ``(path, leaf) -> bool``, a path pattern (regex searched in
      ``"a/b/kernel"``) or a sequence of them, or None for floating leaves with
      ndim >= 2. Use `nnx_filter` for flax nnx filters.

  Returns:
    an `optax.GradientTransformationExtraArgs` whose state is a
    `SparsifyState`. Its `update` requires `params`.

  Example:
    >>> method = sj.magnitude(sj.cubic_schedule(0.9, begin_step=100, end_step=1000))
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

  def keep_tree(masks, params):
    """Masks with True at dense leaves (None where the param is None)."""
    return jax.tree.map(lambda m, p: (None if p is None else True) if m is None else m,
                        masks, params, is_leaf=pytree.is_none)

  def init_fn(params):
    template = pytree.full_masks(params, where)
    masks, method_state = method.init(sharding.gathered(pytree.restrict(template, params)))
    _check_method_masks(masks, template, "init")
    masks = sharding.like(masks, pytree.restrict(masks, params))
    inner_state = inner.init(params)
    if not method.dense_params:
      inner_state = zero_inactive(inner_state, params, keep_tree(masks, params))
    return SparsifyState(count=jnp.zeros([], jnp.int32), masks=masks, inner_state=inner_state,
                         method_state=method_state)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    pytree.check_masks(state.masks, params)
    pytree.check_masks(state.masks, updates, root="updates")
    old, step = state.masks, optax.safe_increment(state.count)  # the masks' next step

    def active_both(before, after):
      return jax.tree.map(lambda o, n: None if o is None else o & n, before, after,
                          is_leaf=pytree.is_none)

    def change(operand):
      masks, method_state, params, updates, step = operand
      new_masks, new_state = method.update(
          sharding.gathered(masks), method_state, sharding.gathered(params),
          sharding.gathered(updates), step)
      _check_method_masks(new_masks, masks, "update")
      # Both branches of the cond must agree in sharding too.
      new_masks = sharding.like(new_masks, masks)
      # Dense-params methods train every entry: they need no `keep`.
      keep = None if method.dense_params else active_both(masks, new_masks)
      return new_masks, sharding.like(new_state, method_state), keep

    def hold(operand):
      masks, method_state = operand[:2]
      return masks, method_state, None if method.dense_params else masks

    # The cond comes first and returns the entries that train at this step
    # (active before and after the change) beside the new masks, so nothing
    # after it reads the old masks and the optimizer step stays one fused
    # pass over the params. A mask update selects entries: no gradient
    # flows through it.
    operand = lax.stop_gradient((old, state.method_state, pytree.restrict(old, params),
                                 pytree.restrict(old, updates), step))
    masks, method_state, keep = uniform_cond(
        jnp.asarray(method.should_update(step), jnp.bool_), change, hold, operand)

    if method.dense_params:
      # Straight-through training: every weight trains with this step's masks;
      # the estimator decides what pruned weights learn.
      if method.estimate_grads is not None:
        estimated = method.estimate_grads(pytree.restrict(old, updates), old,
                                          pytree.restrict(old, params), state.count)
        updates = jax.tree.map(lambda m, g, e: g if m is None else e, old, updates,
                               estimated, is_leaf=pytree.is_none)
      new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    else:
      # Everything not in `keep` (pruned, or grown at this step) gets zero
      # gradient and zero state, and the inner optimizer sees it as zero, so
      # nothing (weight decay included) writes into its state; the update
      # then lands it on exactly zero.
      zero = lambda k, x: x if k is None else jnp.where(k, x, jnp.zeros((), x.dtype))
      grads = jax.tree.map(zero, keep, updates, is_leaf=pytree.is_none)
      inner_state = zero_inactive(state.inner_state, params, keep_tree(keep, params))
      sparse = jax.tree.map(zero, keep, params, is_leaf=pytree.is_none)
      new_updates, inner_state = inner.update(grads, inner_state, sparse, **extra_args)
      new_updates = _land_on_zero(keep, new_updates, params)
    return new_updates, SparsifyState(count=step, masks=masks, inner_state=inner_state,
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
  `optax.inject_hyperparams`, `optax.masked`, `optax.partition` (one
  `sparsify` per branch is fine: each owns its leaves) or
  ``nnx.Optimizer(...).opt_state``. Leaves that no `sparsify` owns are dense
  (None); nnx wrappers are removed, so the result pairs with plain params.

  Raises:
    ValueError: if the state holds no `SparsifyState`, or several that claim
      the same leaf.

  Example:
    >>> masks = sj.get_masks(opt_state)
  """
  is_state = lambda x: isinstance(x, SparsifyState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if not found:
    raise ValueError("the optimizer state holds no SparsifyState: it must come from an "
                     "optimizer built with sj.sparsify")
  is_leaf = lambda x: x is None or _is_masked_node(x) or pytree.is_variable(x)
  flat = [jax.tree_util.tree_flatten_with_path(f.masks, is_leaf=is_leaf) for f in found]
  treedef = flat[0][1]
  if any(d != treedef for _, d in flat):
    raise ValueError(f"the optimizer state holds {len(found)} SparsifyStates over different "
                     "params trees; call get_masks on the state of one of them")
  out = []
  for i, (path, _) in enumerate(flat[0][0]):
    owned = [leaves[i][1] for leaves, _ in flat
             if not (_is_masked_node(leaves[i][1]) or leaves[i][1] is None)]
    if len(owned) > 1:
      raise ValueError(f"{pytree.describe(path, 'masks')} is sparsified by {len(owned)} sparsify "
                       "transformations; each leaf may be sparsified by one only")
    out.append(pytree.unwrap(owned[0]) if owned else None)
  return jax.tree_util.tree_unflatten(treedef, out)
