r"""Block-sparse attention against dense attention, in one process.

For each sequence length, head size and mask pattern, times the forward pass
and forward+backward of every implementation available on the backend, beside
`jax.nn.dot_product_attention` (cuDNN on GPU, XLA elsewhere) on the full and
causal masks. Prints milliseconds, effective TFLOP/s (counting only the
visible blocks) and efficiency = (this implementation's full-layout time x
density) / its sparse time, 1.0 being ideal block skipping.

  python benchmarks/attention.py                     # CPU: seq 1k and 4k
  python benchmarks/attention.py --seqs=4096 --head_dims=64 --patterns=causal,random_1/8
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import attention as sja
from _common import implementations, timed  # pylint: disable=g-multiple-import

_BACKEND = flags.DEFINE_string("backend", None, "cpu, gpu or tpu (default: jax's default).")
_SEQS = flags.DEFINE_list("seqs", None, "Sequence lengths (default: 1024,4096; GPU adds 16384).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head sizes.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads (kv heads = heads).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_BLOCK = flags.DEFINE_integer("block", 128, "Block size of the layouts.")
_PATTERNS = flags.DEFINE_list(
    "patterns", ["full", "causal", "local_512", "s2_shards", "bigbird", "random_1/2",
                 "random_1/4", "random_1/8", "random_1/16", "random_1/32"], "Mask patterns.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
_BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward+backward.")


def make_mask(name, t, heads, block):
  if name == "full":
    return sja.FullMask((t, t))
  if name == "causal":
    return sja.CausalMask((t, t))
  if name.startswith("local_"):
    return sja.CausalMask((t, t)) & sja.LocalMask((t, t), (int(name[6:]), 0))
  if name == "s2_shards":
    return sja.StridedShardMask.for_heads((t, t), heads, block=block, num_shards=4,
                                          local_window=block)
  if name == "bigbird":
    return sja.BigBirdMask((t, t), block=block, num_global=1, window=1, num_random=2)
  if name.startswith("random_"):
    density = 1.0 / float(name.split("/")[1])
    n = t // block
    table = np.random.default_rng(0).random((n, n)) < density
    np.fill_diagonal(table, True)  # every query block sees at least its own keys
    while table.mean() > density + 0.5 / n**2 and table.sum() > n:
      off = np.argwhere(table & ~np.eye(n, dtype=bool))
      table[tuple(off[0])] = False
    return sja.NumpyMask(np.kron(table, np.ones((block, block), bool)))
  raise ValueError(name)


def main(argv):
  del argv
  backend = _BACKEND.value or jax.default_backend()
  seqs = [int(s) for s in (_SEQS.value or (["1024", "4096"] + (["16384"] if backend == "gpu"
                                                                 else [])))]
  b, h, block, repeats = _BATCH.value, _HEADS.value, _BLOCK.value, _REPEATS.value
  print(f"{backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}; batch {b}, "
        f"heads {h}, block {block}, bfloat16 on accelerators, float32 on CPU")
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  target = None
  for t in seqs:
    for d in (int(x) for x in _HEAD_DIMS.value):
      keys = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) for kk in keys)
      flops_full = 4.0 * b * h * t * t * d
      print(f"\nseq {t}, head_dim {d}")
      print(f"{'pattern':<12} {'impl':<14} {'density':>7} {'fwd ms':>9} {'TFLOP/s':>8} "
            f"{'eff':>5} | {'fwd+bwd ms':>10} {'TFLOP/s':>8} {'eff':>5}")
      rows = []
      for causal in (False, True):
        fwd = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c))
        bwd = jax.jit(jax.grad(lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        density = 0.5 if causal else 1.0
        rows.append(("causal" if causal else "full", "dense (jax.nn)", density,
                     timed(fwd, q, k, v, repeats=repeats),
                     timed(bwd, q, k, v, repeats=repeats) if _BACKWARD.value else None))
      dense_full = rows[0][3]
      full_time = {}
      for pattern in _PATTERNS.value:
        layout = sja.make_layout(make_mask(pattern, t, h, block), num_heads=h, block_q=block,
                                 block_kv=block)
        density = float(layout.density())
        for impl in implementations(backend):
          # The layout is a constant of the jit, as in a model (examples/train_lm.py).
          fwd = jax.jit(lambda q, k, v, lay=layout, i=impl: sja.block_sparse_attention(
              q, k, v, lay, implementation=i))
          bwd = jax.jit(jax.grad(lambda q, k, v, lay=layout, i=impl: sja.block_sparse_attention(
              q, k, v, lay, implementation=i).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
          t_fwd = timed(fwd, q, k, v, repeats=repeats)
          t_bwd = timed(bwd, q, k, v, repeats=repeats) if _BACKWARD.value else None
          if pattern == "full":
            full_time[impl] = (t_fwd, t_bwd)
          rows.append((pattern, impl, density, t_fwd, t_bwd))
          if backend == "cpu" and impl == "xla" and pattern == "random_1/8" and t == 4096:
            target = (d, t_fwd / dense_full, density)
      for pattern, impl, density, t_fwd, t_bwd in rows:
        base = full_time.get(impl)
        eff_f = f"{base[0] * density / t_fwd:5.2f}" if base else "     "
        line = (f"{pattern:<12} {impl:<14} {density:7.3f} {1e3 * t_fwd:9.2f} "
                f"{flops_full * density / t_fwd / 1e12:8.3f} {eff_f}")
        if t_bwd is not None:
          eff_b = f"{base[1] * density / t_bwd:5.2f}" if base and base[1] else "     "
          line += (f" | {1e3 * t_bwd:10.2f} {3.5 * flops_full * density / t_bwd / 1e12:8.3f} "
                   f"{eff_b}")
        print(line, flush=True)
      if target and target[0] == d:
        print(f"target (CPU, xla, density {target[2]:.3f}, seq 4096): "
              f"{target[1]:.3f}x the dense full-attention forward time (goal <= 0.2)")


if __name__ == "__main__":
  app.run(main)
