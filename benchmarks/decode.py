r"""Decode-step attention over a KV cache against dense attention, in one process.

For each KV length and batch, times one decode step (`--q_tokens` new tokens
per sequence attending to a full cache) of `sja.decode_attention` (split-KV
in XLA, and the reference), with and without a local-window mask, beside
`jax.nn.dot_product_attention` over the same cache (XLA on CPU). Rows are
timed in interleaved rounds; ratios divide by the dense row of the same
shape. The local-window rows mask the cache but still read all of it: they
show what the mask costs, not what skipping out-of-window pages would save.

  python benchmarks/decode.py                          # KV 4k, 16k, 64k; batch 1 and 8
  python benchmarks/decode.py --kv_lens=65536 --batches=1
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import attention as sja
from _common import timed_rounds  # pylint: disable=g-multiple-import

_KV_LENS = flags.DEFINE_list("kv_lens", ["4096", "16384", "65536"], "KV cache lengths.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads (GQA).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head size.")
_Q_TOKENS = flags.DEFINE_integer("q_tokens", 1, "New tokens per sequence.")
_WINDOW = flags.DEFINE_integer("window", 4096, "Local window of the masked rows.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median).")


def main(argv):
  del argv
  print(f"{jax.default_backend()}, jax {jax.__version__}; heads {_HEADS.value}, kv heads "
        f"{_KV_HEADS.value}, head_dim {_HEAD_DIM.value}, {_Q_TOKENS.value} new token(s), "
        f"float32, median of {_REPEATS.value} interleaved rounds\n")
  print(f"{'kv_len':>7} {'batch':>5}  {'row':<32} {'ms':>9} {'vs dense':>9}")
  rng = np.random.default_rng(0)
  for kv_len in map(int, _KV_LENS.value):
    for batch in map(int, _BATCHES.value):
      q = jnp.asarray(rng.standard_normal((batch, _Q_TOKENS.value, _HEADS.value,
                                           _HEAD_DIM.value), np.float32))
      k, v = (jnp.asarray(rng.standard_normal((batch, kv_len, _KV_HEADS.value, _HEAD_DIM.value),
                                              np.float32)) for _ in range(2))
      lengths = jnp.full((batch,), kv_len, jnp.int32)
      dense = jax.jit(jax.nn.dot_product_attention)  # GQA natively: kv heads divide heads
      local = sja.LocalMask((kv_len, kv_len), (_WINDOW.value, 0))
      rows = [("dense jax.nn", dense, (q, k, v))]
      for name, impl, mask in [("decode xla", "xla", None), ("decode reference", "reference", None),
                               (f"decode xla, local {_WINDOW.value}", "xla", local)]:
        fn = jax.jit(lambda q, k, v, n, impl=impl, mask=mask: sja.decode_attention(
            q, k, v, n, mask=mask, implementation=impl))
        rows.append((name, fn, (q, k, v, lengths)))
      results = timed_rounds([(fn, args) for _, fn, args in rows], repeats=_REPEATS.value)
      base = results[0][0]
      for (name, _, _), (seconds, error) in zip(rows, results):
        if seconds is None:
          print(f"{kv_len:>7} {batch:>5}  {name:<32} {'n/a':>9}  {error}")
        else:
          print(f"{kv_len:>7} {batch:>5}  {name:<32} {1e3 * seconds:9.2f} "
                f"{seconds / base:8.2f}x")


if __name__ == "__main__":
  app.run(main)
