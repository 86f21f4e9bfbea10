"""The dense oracle of the block-sparse matmul, in float32.

It multiplies by ``w.to_dense()``: obviously right, slow, the reference every
other implementation is tested against (and the only one with forward-mode
autodiff, being plain jnp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._src.matmul import format as format_lib


def block_sparse_matmul(x: jax.Array, w: format_lib.BlockSparseMatrix) -> jax.Array:
  """``x @ w.to_dense()`` accumulated in float32. x: [M, K] -> [M, N] in x's dtype."""
  dense = w.to_dense().astype(jnp.float32)
  return jnp.dot(x.astype(jnp.float32), dense).astype(x.dtype)
