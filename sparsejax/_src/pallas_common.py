"""Constants and helpers shared by the Pallas kernels (attention and matmul, GPU and TPU)."""

import jax.numpy as jnp
from jax import lax
import numpy as np

# `lax.dot_general` dimension numbers for 2-d operands.
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b

NEG = -0.7 * float(np.finfo(np.float32).max)  # a finite -inf: masked scores, softmax start
LANES, SUBLANES = 128, 8  # TPU vector tiles


def dot(a, b, dims):
  """`lax.dot_general` accumulating in float32."""
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def triton_params(num_warps: int, num_stages: int):
  """Triton launch settings: passing them selects the Triton backend (Ampere and newer)."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
