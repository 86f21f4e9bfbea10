"""Helpers shared by the kernel tests: host random attention inputs and lowering checks."""

import jax
import jax.numpy as jnp
import numpy as np


def attention_inputs(seed, batch, t, heads, kv_heads, dim, dtype):
  """q, k, v and a cotangent from host random values (jax.random compiles per shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
  q = normal(batch, t, heads, dim).astype(dtype)
  k = normal(batch, t, kv_heads, dim).astype(dtype)
  v = normal(batch, t, kv_heads, dim).astype(dtype)
  return q, k, v, normal(batch, t, heads, dim)


def export_mlir(fn, platform, *args):
  """The MLIR module of `fn` exported for `platform` ("cuda" or "tpu"), Triton calls allowed."""
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()
