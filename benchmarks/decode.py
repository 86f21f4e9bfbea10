r"""Decode-step attention over a KV cache against dense attention, in one process.

For each KV length and batch, times one decode step (`--q_tokens` new tokens
per sequence) beside `jax.nn.dot_product_attention` over the same full cache
(XLA on CPU), with the KV bytes each row reads:

* `decode xla` / `decode reference`: `sja.decode_attention` over the
  contiguous cache; `paged`: the same keys in a `sja.KVCache` (pages of one
  KV head each);
* `local`, `A-shape`, `S2`: caches pruned by the pattern (`sja.append` with
  the mask, so pages no future query reads are never kept), decoded over
  their pages only (`sja.present_pages`): the KV bytes kept are the bytes
  read;
* `top 1/N pages`: Quest, `sja.select_pages` (from per-page key bounds)
  then attention to those pages of the full cache; the time includes the
  selection, and the recall (softmax mass held) is printed.

Rows are timed in interleaved rounds; ratios divide by the dense row of the
same shape. Random keys: the recall of top pages is that of unstructured
data (real models concentrate attention, see examples/generate_lm.py).

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
_PAGE = flags.DEFINE_integer("page_size", 64, "Positions per page.")
_WINDOW = flags.DEFINE_integer("window", 2048, "Window of the local, A-shape and S2 rows.")
_SINK = flags.DEFINE_integer("sink", 64, "Sink tokens of the A-shape row.")
_SHARDS = flags.DEFINE_integer("shards", 8, "Shards of the S2 row (one per KV head and shard).")
_TOP = flags.DEFINE_integer("top", 8, "The top-pages row reads 1/top of the pages.")
_IMPL = flags.DEFINE_string("implementation", None, "decode_attention's implementation for the "
                            "cache rows (default: the fastest available; 'xla' on CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median).")


def pruned(kind, kv_len):
  """(row name, mask, pages kept per KV head) of a pattern that prunes the cache."""
  shape, page, window = (kv_len, kv_len), _PAGE.value, _WINDOW.value
  if kind == "local":
    return f"local {window}, pruned", sja.LocalMask(shape, (window - 1, 0)), window // page + 1
  if kind == "ashape":
    return (f"A-shape {_SINK.value}+{window}, pruned", sja.AShapeMask(shape, _SINK.value, window),
            -(-_SINK.value // page) + window // page + 1)
  shards = _SHARDS.value  # KV head h reads shard h % shards (its query heads share it)
  heads, group = _HEADS.value, _HEADS.value // _KV_HEADS.value
  mask = sja.MultiHeadMask([sja.StridedShardMask(shape, page, shards, (h // group) % shards,
                                                 local_window=window) for h in range(heads)])
  return (f"S2 1/{shards} + {window}, pruned", mask,
          -(-kv_len // (page * shards)) + window // page + 1)


def main(argv):
  del argv
  page, heads, kv_heads, dim = _PAGE.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  impl = _IMPL.value or ("xla" if jax.default_backend() == "cpu" else "pallas")
  print(f"{jax.default_backend()}, jax {jax.__version__}; heads {heads}, kv heads {kv_heads}, "
        f"head_dim {dim}, {_Q_TOKENS.value} new token(s), pages of {page}, float32, median of "
        f"{_REPEATS.value} interleaved rounds; cache rows: implementation={impl!r}\n")
  print(f"{'kv_len':>7} {'batch':>5}  {'row':<30} {'ms':>9} {'vs dense':>9} {'KV read':>8}"
        f"  note")
  rng = np.random.default_rng(0)
  for kv_len in map(int, _KV_LENS.value):
    for batch in map(int, _BATCHES.value):
      q = jnp.asarray(rng.standard_normal((batch, _Q_TOKENS.value, heads, dim), np.float32))
      k, v = (jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, dim), np.float32))
              for _ in range(2))
      lengths = jnp.full((batch,), kv_len, jnp.int32)
      empty = sja.init_cache(batch, kv_heads, dim, page_size=page, max_len=kv_len)
      full = jax.jit(sja.append)(empty, k, v)
      rows = [("dense jax.nn", jax.jit(jax.nn.dot_product_attention), (q, k, v), 1.0, "")]
      for name in dict.fromkeys((impl, "reference")):
        rows.append((f"decode {name}", jax.jit(lambda q, k, v, n, name=name: sja.decode_attention(
            q, k, v, n, implementation=name)), (q, k, v, lengths), 1.0, ""))
      paged = jax.jit(lambda q, c: sja.decode_attention(q, c.k, c.v, c.lengths,
                                                        page_table=c.page_table,
                                                        implementation=impl))
      rows.append(("decode, paged", paged, (q, full), 1.0, ""))
      for kind in ("local", "ashape", "s2"):
        name, mask, kept = pruned(kind, kv_len)
        small = sja.init_cache(batch, kv_heads, dim, page_size=page, max_len=kv_len,
                               num_pages=batch * kv_heads * kept)  # what the pattern keeps
        t = kv_len - _Q_TOKENS.value  # the prompt, then the new tokens decoding attends
        cache = jax.jit(lambda c, k, v, mask=mask, t=t: sja.append(
            sja.append(c, k[:, :t], v[:, :t], mask=mask, prefill=True), k[:, t:], v[:, t:],
            mask=mask))(small, k, v)
        assert int(cache.dropped.sum()) == 0
        fn = jax.jit(lambda q, c, mask=mask, kept=kept: sja.decode_attention(
            q, c.k, c.v, c.lengths, page_table=c.page_table, mask=mask,
            pages=sja.present_pages(c, k_pages=kept), implementation=impl))
        want = sja.decode_attention(q, k, v, lengths, mask=mask)  # the pattern on the full cache
        err = float(jnp.abs(fn(q, cache) - want).max())
        assert err < 1e-3, f"{name}: the pruned cache decodes differently ({err:.2e})"
        share = float(sja.kv_bytes(cache)) / float(sja.kv_bytes(full))
        rows.append((name, fn, (q, cache), share, ""))
      top = max(kv_len // page // _TOP.value, 1)
      quest = jax.jit(lambda q, c: sja.decode_attention(
          q, c.k, c.v, c.lengths, page_table=c.page_table,
          pages=sja.select_pages(q, c, k_pages=top), implementation=impl))
      recall = sja.page_recall(q, full, sja.select_pages(q, full, k_pages=top))
      rows.append((f"top 1/{_TOP.value} pages (Quest)", quest, (q, full), top * page / kv_len,
                   f"recall {float(recall.mean()):.2f} (random keys)"))
      results = timed_rounds([(fn, args) for _, fn, args, _, _ in rows], repeats=_REPEATS.value)
      base = results[0][0]
      for (name, _, _, share, note), (seconds, error) in zip(rows, results):
        if seconds is None:
          print(f"{kv_len:>7} {batch:>5}  {name:<30} {'n/a':>9}  {error}")
        else:
          print(f"{kv_len:>7} {batch:>5}  {name:<30} {1e3 * seconds:9.2f} "
                f"{seconds / base:8.2f}x {share:8.3f}  {note}")


if __name__ == "__main__":
  app.run(main)
