"""Helpers shared by the benchmark scripts."""

import time

import jax
import numpy as np


def timed(fn, *args, repeats):
  """Median wall time of `fn(*args)` over `repeats` runs, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def implementations(backend):
  """The block-sparse implementations worth timing on `backend`."""
  if backend == "gpu":
    return ["xla", "pallas_triton"]
  if backend == "tpu":
    return ["xla", "pallas_tpu"]
  return ["xla"]
