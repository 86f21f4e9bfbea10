"""Activations trained to be sparse: top-k with a straight-through gradient, ReLU², ProSparse.

References:
  Q-Sparse: All Large Language Models can be Fully Sparsely-Activated. Wang,
  Ma, Wang, Huang, Wang, Wei, 2024. arXiv:2407.10969.
  ReLU² Wins: Discovering Efficient Activation Functions for Sparse LLMs.
  Zhang et al., 2024. arXiv:2402.03804.
  ProSparse: Introducing and Enhancing Intrinsic Activation Sparsity within
  Large Language Models. Song et al., 2024. arXiv:2402.13516.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src import _checks


def _count(k: Any, size: int) -> int:
  """A count of entries from an int or a fraction in (0, 1]."""
  if isinstance(k, bool) or not isinstance(k, (int, float)):
    raise ValueError(f"k={k!r} must be an int count or a float fraction in (0, 1]")
  if isinstance(k, float):
    if not 0 < k <= 1:
      raise ValueError(f"k={k} as a fraction must lie in (0, 1]")
    return max(1, round(k * size))
  if not 1 <= k <= size:
    raise ValueError(f"k={k} must be in [1, {size}] (the size of the axis)")
  return k


def topk(x: jax.Array, k: int | float, *, axis: int = -1) -> jax.Array:
  """Keeps the `k` largest-magnitude entries along `axis`, zeroing the rest (Q-Sparse).

  Forward: exactly `k` entries per row keep their values (ties to the lower
  index). Backward: the straight-through estimator, the identity: the
  gradient reaches every entry, kept or not, as Q-Sparse trains it.

  Args:
    x: activations.
    k: entries kept per row: an int count, or a float fraction of the axis.
    axis: the axis rows run along.

  Example:
    >>> h = sj.activations.topk(jax.nn.relu(x @ w_up), 0.25)  # a quarter of the units fire
  """
  axis = _checks.axis(axis, x.shape, "x")
  k = _count(k, x.shape[axis])
  rows = jnp.moveaxis(x, axis, -1)
  flat = rows.reshape(-1, rows.shape[-1])
  _, kept = jax.lax.top_k(jnp.abs(flat), k)  # equal magnitudes: the lower index first
  keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], kept].set(True)
  keep = jax.lax.stop_gradient(jnp.moveaxis(keep.reshape(rows.shape), -1, axis))
  return x + jax.lax.stop_gradient(jnp.where(keep, x, 0) - x)


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU, ``relu(x) ** 2``: an activation with many exact zeros (ReLU²)."""
  return jnp.square(jax.nn.relu(x))


def l1_penalty(activations: Any, strength: Any, step: Any = None) -> jax.Array:
  """ProSparse's activation regularizer: ``strength * mean |a|`` over all activation arrays.

  Args:
    activations: an array or a pytree of arrays (the FFN's ReLU outputs).
    strength: a float, or a schedule ``step -> float`` (`prosparse_schedule`).
    step: the training step, needed for a schedule.

  Example:
    >>> loss = task_loss + sj.activations.l1_penalty(hidden, schedule, step)
  """
  if callable(strength):
    if step is None:
      raise ValueError("strength is a schedule: pass the training step")
    strength = strength(step)
  leaves = jax.tree.leaves(activations)
  if not leaves:
    raise ValueError("activations holds no array")
  total = sum(jnp.sum(jnp.abs(a.astype(jnp.float32))) for a in leaves)
  return strength * total / sum(a.size for a in leaves)


def prosparse_schedule(final: float, *, warmup_steps: int, stages: int = 4,
                       stage_steps: int) -> Any:
  """ProSparse's progressive L1 strength: 0 during warm-up, then rising in `stages` steps.

  Strength ``final * i / stages`` during stage ``i`` (1-based), each
  `stage_steps` long, after `warmup_steps` without the penalty; `final`
  from the last stage on. The paper raises it gradually so the model keeps
  its quality while activations become sparse.
  """
  for name, value in [("warmup_steps", warmup_steps), ("stages", stages),
                      ("stage_steps", stage_steps)]:
    _checks.static_int(name, value, minimum=0 if name == "warmup_steps" else 1)
  if isinstance(final, bool) or not isinstance(final, (int, float)) or final < 0:
    raise ValueError(f"final={final!r} must be a float >= 0")

  def schedule(step):
    stage = jnp.clip((jnp.asarray(step) - warmup_steps) // stage_steps + 1, 0, stages)
    return final * stage.astype(jnp.float32) / stages

  return schedule


def sparsity(activations: Any, *, threshold: float = 0.0) -> Any:
  """The share of entries with ``|a| <= threshold`` in each activation array (a pytree)."""
  return jax.tree.map(lambda a: jnp.mean(jnp.abs(a) <= threshold), activations)
