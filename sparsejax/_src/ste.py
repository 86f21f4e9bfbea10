"""The straight-through masking primitive behind every estimator.

``masked_weight(w, mask, grad_scale, decay)`` is ``w`` with pruned entries
zeroed in the forward pass. Its backward pass gives kept entries the incoming
gradient and pruned entries ``grad_scale * g + decay * w``:

- hard: ``grad_scale=0, decay=0`` (pruned entries learn nothing);
- STE: ``grad_scale=1, decay=0`` (the gradient passes straight through);
- SR-STE: ``grad_scale=1, decay=lambda`` (Zhou et al. 2021);
- decayed gradient flow: ``grad_scale`` (and ``decay``) scaled by a schedule
  that goes to 0 (Bambhaniya et al. 2024).

Only reverse-mode autodiff (`jax.grad`, `jax.vjp`) goes through it: the
backward pass with ``decay`` is not the transpose of a linear map, so no
forward-mode rule exists, and `jax.jvp` / `jax.jacfwd` raise JAX's
custom_vjp error. For forward mode, mask with ``apply_masks(..., ste=False)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def masked_weight(w: jax.Array, mask: jax.Array, grad_scale: jax.Array | float = 1.0,
                  decay: jax.Array | float = 0.0) -> jax.Array:
  """`w` with entries where `mask` is False set to zero, with a tunable backward.

  Args:
    w: weights of any shape.
    mask: bool array broadcastable to `w` (True = kept).
    grad_scale: factor on the gradient reaching pruned entries.
    decay: coefficient of ``w`` added to the gradient of pruned entries.

  Returns:
    ``where(mask, w, 0)``; gradient ``g`` for kept entries and
    ``grad_scale * g + decay * w`` for pruned ones. `mask`, `grad_scale` and
    `decay` get no gradient. Reverse mode only (see the module docstring).

  Example:
    >>> y = sj.masked_weight(w, mask, grad_scale=1.0, decay=2e-4)   # SR-STE
  """
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _fwd(w, mask, grad_scale, decay):
  return masked_weight(w, mask, grad_scale, decay), (w, mask, grad_scale, decay)


def _bwd(residuals, g):
  w, mask, grad_scale, decay = residuals
  scale = jnp.asarray(grad_scale, g.dtype)
  pruned = scale * g + jnp.asarray(decay, g.dtype) * w.astype(g.dtype)
  dw = jnp.where(mask, g, pruned).astype(w.dtype)
  return (dw, None, jnp.zeros_like(jnp.asarray(grad_scale, jnp.float32)),
          jnp.zeros_like(jnp.asarray(decay, jnp.float32)))


masked_weight.defvjp(_fwd, _bwd)
