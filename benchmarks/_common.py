"""Helpers shared by the benchmark scripts: timing, result files and the MLP they train."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def timed(fn, *args, repeats):
  """Median wall time of `fn(*args)` over `repeats` runs, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def describe(error):
  """One line for a failed benchmark row: the exception's type and first line."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def timed_rounds(calls, *, repeats):
  """Median wall time of each `fn(*args)` in `calls` over rounds that interleave them.

  Every call runs once to compile, then each round runs each call once, so a
  load that drifts on a shared machine moves all of them alike and their
  ratios hold. A call that raises (an implementation that does not support
  the row yet, a failed compile, out of memory) gets ``(None, describe(e))``
  and leaves the rounds; the others go on.

  Returns:
    a list of ``(seconds or None, error or None)``, one per call.
  """
  errors = [None] * len(calls)
  times = [[] for _ in calls]

  def run(i):
    fn, args = calls[i]
    try:
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      return time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-exception-caught
      errors[i] = describe(e)
      return None

  for i in range(len(calls)):
    run(i)
  for _ in range(repeats):
    for i in range(len(calls)):
      if errors[i] is None:
        times[i].append(run(i))
  return [(float(np.median(t)) if errors[i] is None else None, errors[i])
          for i, t in enumerate(times)]


class Rows:
  """Benchmark rows kept in a list and, given a path, rewritten as JSON after each one.

  The file is ``{"meta": {...}, "rows": [{...}, ...]}``, replaced atomically,
  so a run that is killed part way still leaves every row it finished.
  """

  def __init__(self, path, **meta):
    self.path, self.meta, self.rows = path, meta, []
    self._write()

  def add(self, **row):
    self.rows.append(row)
    self._write()
    return row

  def _write(self):
    if not self.path:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump({"meta": self.meta, "rows": self.rows}, f, indent=1)
    os.replace(tmp, self.path)


def implementations(backend):
  """The block-sparse implementations worth timing on `backend`."""
  if backend == "gpu":
    return ["xla", "pallas_triton"]
  if backend == "tpu":
    return ["xla", "pallas_tpu"]
  return ["xla"]


def mlp_params(key, sizes):
  """A list of {"w", "b"} layers for `sizes` = [inputs, hidden..., outputs]."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_loss(params, x, y):
  """Softmax cross-entropy of the ReLU MLP `params` on integer labels."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
  logits = x @ params[-1]["w"] + params[-1]["b"][None]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def argsort_masks(scores, sparsity):
  """The usual exact top-k: rank every entry of each leaf with a full argsort."""
  def one(s):
    if s is None:
      return None
    k = int(round((1 - sparsity) * s.size))
    order = jnp.argsort(-s.reshape(-1), stable=True)
    return jnp.zeros(s.size, bool).at[order[:k]].set(True).reshape(s.shape)
  return jax.tree.map(one, scores, is_leaf=lambda x: x is None)
