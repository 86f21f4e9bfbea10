"""Importance scores: one signature for every method.

A score function is ``score(params, grads, masks, ctx) -> scores``: it takes
trees restricted to the sparsified leaves (``None`` at dense leaves), the
masks before the update and an `UpdateContext`, and returns float scores of
the params' shapes; higher means "keep" (or "grow"). Methods decide which
entries a score may pick (active ones to keep, inactive ones to grow), so a
score never needs to know the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax._src import pytree

PyTree = Any


class UpdateContext(NamedTuple):
  """What a score function sees besides params, grads and masks.

  Attributes:
    step: the step of this mask update.
    key: a PRNG key for this update, ``fold_in(key, step)``.
    state: the score state, if the method was given ``score_state``.
  """

  step: jax.Array
  key: jax.Array
  state: Any


ScoreFn = Callable[[PyTree, PyTree, PyTree, UpdateContext], PyTree]


def _f32_abs(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), tree)


def magnitude_score(params, grads, masks, ctx):
  """``|w|``: keep the largest weights (magnitude pruning, the drop score of RigL and SET)."""
  del grads, masks, ctx
  return _f32_abs(params)


def gradient_score(params, grads, masks, ctx):
  """``|g|`` of the dense gradient: grow where the loss would move most (RigL)."""
  del params, masks, ctx
  return _f32_abs(grads)


def saliency_score(params, grads, masks, ctx):
  """SNIP's connection sensitivity ``|w * g|``."""
  del masks, ctx
  return jax.tree.map(lambda w, g: jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)),
                      params, grads)


def random_score(params, grads, masks, ctx):
  """Uniform random scores in [0, 1) from the update's key: grow at random (SET)."""
  del params, grads
  return random_scores(masks, ctx.key)


def random_scores(like: PyTree, key: jax.Array) -> PyTree:
  """Uniform scores in [0, 1) of the shapes of `like`'s leaves, one key per leaf index."""
  leaves, treedef = pytree.flatten(like)
  out = [None if x is None else jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x))
         for i, (_, x) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)
