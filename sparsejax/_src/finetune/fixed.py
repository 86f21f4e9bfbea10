"""Sparse fine-tuning on a fixed support: given indices, LT-SFT's and S2FT's.

References:
  Composable Sparse Fine-Tuning for Cross-Lingual Transfer (LT-SFT). Ansell,
  Ponti, Korhonen, Vulić, 2022. arXiv:2110.07560.
  S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
  Sparsity. Yang, Chen, Zhang, Xie, Cheng, Ye, Cao, 2024. arXiv:2412.06289.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import _checks
from sparsejax._src import pytree
from sparsejax._src import schedules
from sparsejax._src.finetune import delta as delta_lib

_never = schedules.update_steps(update_every=1, end_step=0)


def _aligned(tree, leaves, name):
  """The leaves of `tree`, one per leaf of the params (`leaves`), or a ValueError."""
  out = [pytree.unwrap(x) for _, x in pytree.flatten(tree)[0]]
  if len(out) != len(leaves):
    raise ValueError(f"{name} has {len(out)} leaves, params {len(leaves)}: {name} of another "
                     f"model?")
  return out


def fixed(indices: Any) -> delta_lib.Selector:
  """A fixed support: `indices` (int[k] flat indices per fine-tuned leaf, None elsewhere)."""

  def init(params, allowed):
    del allowed
    leaves, treedef = pytree.flatten(params)
    given = _aligned(indices, leaves, "indices")
    out = []
    for (path, p), i in zip(leaves, given):
      if (p is None) != (i is None):
        raise ValueError(f"indices at {pytree.describe(path)} is {'None' if i is None else 'set'}"
                         f" where the leaf is {'not ' if p is None else ''}fine-tuned")
      host = np.asarray(i) if i is not None and _checks.is_concrete(i) else None
      if host is not None and (host.ndim != 1 or (host.size and (
          host.max() >= p.size or host.min() < 0)) or len(np.unique(host)) != host.size):
        raise ValueError(f"indices at {pytree.describe(path)} must be distinct flat indices "
                         f"into its {p.size} entries")
      out.append(None if i is None else jnp.asarray(i, jnp.int32))
    return jax.tree.unflatten(treedef, out), None

  return delta_lib.Selector(init, None, _never)


def lt_sft(density: float, *, finetuned: Any) -> delta_lib.Selector:
  """LT-SFT: the entries that moved most in a full fine-tune, retrained from the base.

  Run a short full fine-tune first; this keeps per leaf the `density` share
  of entries with the largest ``|finetuned - base|`` (among the allowed
  ones) as a fixed support, and the delta starts at 0 over the base.

  Args:
    density: share of each leaf's entries kept, in (0, 1].
    finetuned: the params after the full fine-tune (the base's structure).

  Example:
    >>> selector = sj.finetune.lt_sft(0.03, finetuned=fully_tuned)
    >>> tx = sj.finetune.sparse_delta(optax.adamw(1e-3), selector)
  """
  density = _checks.density(density, "lt_sft")

  def init(params, allowed):
    leaves, treedef = pytree.flatten(params)
    tuned = _aligned(finetuned, leaves, "finetuned")
    out = []
    for (path, p), t, a in zip(leaves, tuned, jax.tree.leaves(allowed, is_leaf=pytree.is_none)):
      if p is None:
        out.append(None)
        continue
      if jnp.shape(t) != p.shape:
        raise ValueError(f"finetuned at {pytree.describe(path)} has shape {jnp.shape(t)}, the "
                         f"base {p.shape}")
      change = jnp.abs(jnp.asarray(t, jnp.float32) - p.astype(jnp.float32)).reshape(-1)
      change = change if a is None else jnp.where(a, change, -1.0)
      out.append(delta_lib.top_indices(change, delta_lib.budget(density, p.size)))
    return jax.tree.unflatten(treedef, out), None

  return delta_lib.Selector(init, None, _never)


def s2ft(density: float, *, key: jax.Array, axis: int = -1) -> delta_lib.Selector:
  """S2FT: whole slices (output channels, heads) of each leaf, trained densely inside.

  Per leaf, ``round(density * shape[axis])`` (at least 1) random indices
  along `axis` are chosen, and the delta holds every entry of those slices:
  columns of a ``[in, out]`` kernel with the default ``axis=-1``, rows with
  ``axis=0``.

  Args:
    density: share of each leaf's slices, in (0, 1].
    key: for the random choice.
    axis: the axis whose slices are chosen.

  Example:
    >>> selector = sj.finetune.s2ft(0.03, key=jax.random.key(0))
  """
  density = _checks.density(density, "s2ft")
  _checks.key(key)
  _checks.static_int("axis", axis)

  def init(params, allowed):
    leaves, treedef = pytree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, p), k in zip(leaves, keys):
      if p is None:
        out.append(None)
        continue
      if not -p.ndim <= axis < p.ndim:
        raise ValueError(f"s2ft: axis={axis} is outside {pytree.describe(path)} of shape "
                         f"{p.shape}")
      n = p.shape[axis]
      chosen = jax.random.choice(k, n, (max(1, round(density * n)),), replace=False)
      slices = jnp.zeros((n,), bool).at[chosen].set(True)
      where = jnp.broadcast_to(jnp.expand_dims(slices, [d for d in range(p.ndim)
                                                       if d != axis % p.ndim]), p.shape)
      out.append(jnp.nonzero(where.reshape(-1), size=int(chosen.size) * (p.size // n))[0]
                 .astype(jnp.int32))
    del allowed  # slices are whole: with a sparse base their zeros are kept by the wrapper
    return jax.tree.unflatten(treedef, out), None

  return delta_lib.Selector(init, None, _never)
