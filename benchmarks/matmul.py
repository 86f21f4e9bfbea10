r"""Block-sparse matmul against dense `jnp.dot`, in one process.

For each size M = K = N and block density, times ``x @ w`` (forward) and its
gradient with respect to x and w (forward+backward) for every implementation
available on the backend, and prints each time divided by the dense
`jnp.dot` time measured in the same run. Ideal block skipping gives a ratio
equal to the density. Layouts keep the same number of blocks in every block
column (so no slot is padding).

  python benchmarks/matmul.py                       # CPU: 512 and 2048
  python benchmarks/matmul.py --sizes=2048 --densities=1,0.125
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from _common import implementations, timed  # pylint: disable=g-multiple-import

_BACKEND = flags.DEFINE_string("backend", None, "cpu, gpu or tpu (default: jax's default).")
_SIZES = flags.DEFINE_list("sizes", None, "M = K = N (default: 512,2048 on CPU, else 1024,4096).")
_DENSITIES = flags.DEFINE_list("densities", ["1", "0.5", "0.25", "0.125", "0.0625"],
                               "Fractions of active blocks.")
_BLOCK = flags.DEFINE_integer("block", 128, "Block size (square blocks).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (median).")


def balanced_layout(rng, grid, density):
  """`density` of each block column active, rows drawn at random."""
  rows, cols = grid
  per_col = max(1, round(density * rows))
  layout = np.zeros(grid, bool)
  for j in range(cols):
    layout[rng.permutation(rows)[:per_col], j] = True
  return layout


def main(argv):
  del argv
  backend = _BACKEND.value or jax.default_backend()
  sizes = [int(s) for s in (_SIZES.value or (["512", "2048"] if backend == "cpu"
                                              else ["1024", "4096"]))]
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  block, repeats = _BLOCK.value, _REPEATS.value
  print(f"{backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}; {dtype.__name__}, "
        f"blocks {block}x{block}; time / dense jnp.dot time (ideal: the density)")
  rng = np.random.default_rng(0)
  target = None
  for n in sizes:
    kx, kw, kc = jax.random.split(jax.random.key(n), 3)
    x = jax.random.normal(kx, (n, n), dtype)
    dense_w = jax.random.normal(kw, (n, n), dtype)
    ct = jax.random.normal(kc, (n, n), dtype)
    dense_fwd = jax.jit(jnp.dot)
    dense_bwd = jax.jit(jax.grad(lambda x, w: jnp.vdot(jnp.dot(x, w), ct).astype(jnp.float32),
                                 argnums=(0, 1)))
    t_fwd = timed(dense_fwd, x, dense_w, repeats=repeats)
    t_bwd = timed(dense_bwd, x, dense_w, repeats=repeats)
    print(f"\nM=K=N={n}: dense jnp.dot fwd {1e3 * t_fwd:.2f} ms, fwd+bwd {1e3 * t_bwd:.2f} ms")
    print(f"{'density':>8} {'impl':<14} {'fwd ms':>9} {'fwd ratio':>9} | {'f+b ms':>9} "
          f"{'f+b ratio':>9}")
    seen = set()
    for d in (float(s) for s in _DENSITIES.value):
      layout = balanced_layout(rng, (n // block, n // block), d)
      density = float(layout.mean())
      if density in seen:  # too few blocks per column for this density
        continue
      seen.add(density)
      w = sj.matmul.BlockSparseMatrix.from_dense(dense_w, layout)
      for impl in implementations(backend):
        fwd = jax.jit(lambda x, w, i=impl: sj.matmul.block_sparse_matmul(x, w, implementation=i))
        bwd = jax.jit(jax.grad(
            lambda x, v, w, i=impl: jnp.vdot(sj.matmul.block_sparse_matmul(
                x, w._replace(values=v), implementation=i), ct).astype(jnp.float32),
            argnums=(0, 1)))
        s_fwd = timed(fwd, x, w, repeats=repeats)
        s_bwd = timed(bwd, x, w.values, w, repeats=repeats)
        print(f"{density:8.4f} {impl:<14} {1e3 * s_fwd:9.2f} {s_fwd / t_fwd:9.3f} | "
              f"{1e3 * s_bwd:9.2f} {s_bwd / t_bwd:9.3f}", flush=True)
        if backend == "cpu" and impl == "xla" and n == 2048 and density <= 0.125:
          target = max(target or 0.0, s_fwd / t_fwd)
  if target is not None:
    print(f"\ntarget (CPU, xla, K=N=2048, density <= 1/8): worst fwd ratio {target:.3f} "
          "(goal < 1: faster than dense)")


if __name__ == "__main__":
  app.run(main)
