r"""Generates from the trained byte-level LM with a paged KV cache, dense and sparse.

Trains the dense transformer of `train_lm.py` (or restores it from the orbax
checkpoint `prune_lm.py` writes and reads, keyed by the model flags), then
runs the same weights one token at a time over a `sja.KVCache` per layer,
under each decode-time pattern:

* `dense`: causal attention over the full cache;
* `local`: the `--window` most recent keys; `sja.append` with the mask frees
  the pages no later query reads, so the cache keeps only the window;
* `ashape`: the first `--sink` keys and the `--window` most recent (A-shape,
  StreamingLLM), pruned the same way;
* `s2`: S2-Attention shards of one page each (`--shards`, strided over the
  heads) and the window; a page holds one KV head, so each head keeps only
  its shard and its window;
* `topk_pages`: the full cache, of which each step reads the `--pages`
  pages per KV head that `sja.select_pages` bounds highest (Quest).

A pruned pattern's pool holds only the most pages the pattern keeps at
once, and each step reads only the pages held (`pages=`). Every pattern
runs the model trained with dense attention. Per pattern the
script prints the teacher-forced validation loss (the validation sequences
decoded token by token, each next byte predicted from the cache), the KV
bytes the cache holds at the end of a sequence (`sja.kv_bytes`, all layers),
the pages read per step, Quest's page recall (`sja.page_recall`) and the
tokens per second of a jitted generation of `--seq - --prompt` bytes from a
prompt (fed token by token within the timed call), all beside dense. Dense
decoding must reproduce the model's own full-sequence loss; the script
checks it. A PNG plots loss against KV bytes.

  python examples/generate_lm.py                        # ~2 min on 2 CPU cores (reruns: 30 s)
  python examples/generate_lm.py --patterns=dense,ashape --sink=4 --window=64
  python examples/generate_lm.py --steps=2000 --checkpoint=/tmp/lm_ckpt --temperature=0
"""

import time
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import attention as sja
import prune_lm  # the dense model, trained or restored from its checkpoint
import train_lm  # the model, corpus and flags of the training example

flags.FLAGS.set_default("steps", 600)
flags.FLAGS.set_default("seq", 256)
flags.FLAGS.set_default("batch", 8)
flags.FLAGS.set_default("eval_batches", 4)
flags.FLAGS.set_default("plot_path", "generate_lm.png")

PATTERNS = ("dense", "local", "ashape", "s2", "topk_pages")
_PATTERNS = flags.DEFINE_list("patterns", list(PATTERNS), f"Decode patterns of {PATTERNS}.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Positions per KV-cache page.")
_SINK = flags.DEFINE_integer("sink", 16, "Sink tokens of ashape.")
_SHARDS = flags.DEFINE_integer("shards", 4, "S2 shards: every shards-th page, one per head.")
_PAGES = flags.DEFINE_integer("pages", 4, "Pages per step and KV head read by topk_pages.")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt bytes for generation.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 8, "Sequences generated at once (timed).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
_TIMED_RUNS = flags.DEFINE_integer("timed_runs", 5, "Timed generations (the fastest counts).")

# pylint: disable-next=protected-access
_SEQ, _HEADS, _DIM, _WINDOW = train_lm._SEQ, train_lm._HEADS, train_lm._DIM, train_lm._WINDOW


class Pattern(NamedTuple):
  """A decode-time pattern: what each step attends and what the cache keeps."""

  mask: object  # sja.Mask, sja.MultiHeadMask or None (causal over the full cache)
  pages: int  # pages per (sequence, KV head) a step reads
  quest: bool  # the pages are chosen per step by select_pages
  pool: int | None  # pool pages per (sequence, KV head); None: the full cache


def make_pattern(name):
  t, size, window = _SEQ.value, _PAGE_SIZE.value, _WINDOW.value
  n = t // size
  if name == "dense":
    return Pattern(None, n, False, None)
  if name == "topk_pages":
    return Pattern(None, min(_PAGES.value, n), True, None)
  if name == "local":  # the window most recent keys, the query's own included
    mask = sja.LocalMask((t, t), (window - 1, 0))
  elif name == "ashape":
    mask = sja.AShapeMask((t, t), _SINK.value, window)
  else:
    mask = sja.StridedShardMask.for_heads((t, t), _HEADS.value, block=size,
                                          num_shards=_SHARDS.value, local_window=window)
  held = pages_held(mask)
  return Pattern(mask, held, False, held)


def pages_held(mask):
  """The most pages a KV head holds at once when `sja.append` prunes by `mask`.

  At each length: the pages with a key written so far that some later
  query may read (`sja.kv_needed`), and the page the next token is written to.
  """
  t, size = _SEQ.value, _PAGE_SIZE.value
  lengths, positions = jnp.arange(t), jnp.arange(t)
  need = sja.kv_needed(mask, positions, query_position=lengths, num_heads=_HEADS.value)  # [t, heads, t]
  need &= (positions[None] < lengths[:, None])[:, None]
  held = need.reshape(t, _HEADS.value, t // size, size).any(-1)
  held |= jnp.arange(t // size)[None, None] == (lengths // size)[:, None, None]
  return int(held.sum(-1).max())


def empty_caches(pattern, batch):
  """One empty cache per layer; a pruned pattern's pool holds only what it keeps."""
  pool = None if pattern.pool is None else batch * _HEADS.value * pattern.pool
  return [sja.init_cache(batch, _HEADS.value, _DIM.value // _HEADS.value,
                         page_size=_PAGE_SIZE.value, max_len=_SEQ.value, num_pages=pool)
          for _ in range(train_lm._LAYERS.value)]  # pylint: disable=protected-access


def decode_step(model, pattern, caches, tokens, position):
  """Feeds `tokens` [batch] at `position` through the model's own layers.

  Returns:
    (logits [batch, 256] of the next byte, the caches with the token
    appended, Quest's page recall averaged over layers, or 1).
  """
  batch, heads, dim = tokens.shape[0], _HEADS.value, _DIM.value
  x = model.embed(tokens)[:, None] + model.position[...][position][None, None]  # [batch, 1, dim]
  new_caches, recalls = [], []
  for block, cache in zip(model.blocks, caches):
    qkv = block.attention.qkv(block.norm1(x)).reshape(batch, 1, 3 * heads, dim // heads)
    q, k, v = jnp.split(qkv, 3, axis=2)
    cache = sja.append(cache, k, v, mask=pattern.mask)
    pages = None
    if pattern.quest:
      pages = sja.select_pages(q, cache, k_pages=pattern.pages)
      recalls.append(jnp.mean(sja.page_recall(q, cache, pages)))
    elif pattern.mask is not None:  # read only the pages the pruned cache holds
      pages = sja.present_pages(cache, k_pages=pattern.pages)
    o = sja.decode_attention(q, cache.k, cache.v, cache.lengths, page_table=cache.page_table,
                             mask=pattern.mask, pages=pages)
    x = x + block.attention.out(o.reshape(batch, 1, dim))
    x = x + block.down(block.activation(block.up(block.norm2(x))))
    new_caches.append(cache)
  recall = jnp.mean(jnp.stack(recalls)) if recalls else jnp.float32(1)
  return model.embed.attend(model.norm(x))[:, 0], new_caches, recall


def teacher_forced(model, pattern, x, y):
  """Decodes the sequences `x` [batch, seq] token by token under `pattern`.

  Returns:
    (mean cross-entropy of the next-byte predictions against `y`, mean page
    recall over the steps where Quest had pages to leave out, KV bytes per
    sequence at the end (all layers), tokens the caches dropped).
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x, y):
    model = nnx.merge(graphdef, state)

    def body(caches, inputs):
      position, tokens, targets = inputs
      logits, caches, recall = decode_step(model, pattern, caches, tokens, position)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return caches, (loss, recall)

    steps = jnp.arange(x.shape[1])
    caches, (losses, recalls) = jax.lax.scan(
        body, empty_caches(pattern, x.shape[0]), (steps, x.T, y.T))
    chosen = steps >= pattern.pages * _PAGE_SIZE.value  # more pages than Quest reads
    recall = jnp.sum(jnp.where(chosen, recalls, 0)) / jnp.maximum(jnp.sum(chosen), 1)
    kv = sum(sja.kv_bytes(c) for c in caches) / x.shape[0]
    return losses.mean(), recall, kv, sum(jnp.sum(c.dropped) for c in caches)

  return [float(v) for v in run(state, jnp.asarray(x), jnp.asarray(y))]


def generator(model, pattern, key):
  """A jitted ``prompt [batch, prompt_len] -> bytes [batch, seq - prompt_len]`` function.

  One scan over the positions: the prompt's bytes are fed one a step (as a
  cache is filled in serving without a prefill kernel), then bytes sampled
  with `key` at `--temperature` (greedy at 0).
  """
  graphdef, state = nnx.split(model)
  temperature, seq = _TEMPERATURE.value, _SEQ.value

  @jax.jit
  def generate(state, prompt):
    model = nnx.merge(graphdef, state)
    batch, given = prompt.shape
    forced = jnp.zeros((batch, seq), jnp.int32).at[:, :given].set(prompt)

    def body(carry, inputs):
      caches, logits = carry
      position, step_key, prompt_tokens = inputs
      if temperature > 0:
        sampled = jax.random.categorical(step_key, logits / temperature)
      else:
        sampled = jnp.argmax(logits, axis=-1)
      tokens = jnp.where(position < given, prompt_tokens, sampled)
      logits, caches, _ = decode_step(model, pattern, caches, tokens, position)
      return (caches, logits), tokens

    init = (empty_caches(pattern, batch), jnp.zeros((batch, 256), jnp.float32))
    xs = (jnp.arange(seq), jax.random.split(key, seq), forced.T)
    return jax.lax.scan(body, init, xs)[1].T[:, given:]

  return lambda prompt: generate(state, prompt)


def tokens_per_second(model, pattern, prompts, key):
  """(generated bytes [batch, new], new bytes per second of the fastest timed generation)."""
  generate = generator(model, pattern, key)
  out = jax.block_until_ready(generate(prompts))  # compiles
  times = []
  for _ in range(_TIMED_RUNS.value):
    start = time.perf_counter()
    jax.block_until_ready(generate(prompts))
    times.append(time.perf_counter() - start)
  return np.asarray(out), out.size / min(times)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if not _PATTERNS.value or any(p not in PATTERNS for p in _PATTERNS.value):
    raise app.UsageError(f"--patterns takes a list of {PATTERNS}, got {_PATTERNS.value}")
  if _SEQ.value % _PAGE_SIZE.value or _DIM.value % _HEADS.value:
    raise app.UsageError("--page_size must divide --seq, and --heads --dim")
  if train_lm._DOCUMENTS.value:  # pylint: disable=protected-access
    raise app.UsageError("--documents is not supported: decoding here attends across documents")
  if not 0 < _PROMPT.value < _SEQ.value:
    raise app.UsageError(f"--prompt={_PROMPT.value} must be in (0, --seq={_SEQ.value})")
  data = train_lm.load_corpus(train_lm._TEXT_FILE.value)  # pylint: disable=protected-access
  train_data, val_data, val_batches = train_lm.split_corpus(data)  # the checkpoint's split
  x, y = map(np.concatenate, zip(*val_batches))
  model = prune_lm.trained_model(train_data)
  full = float(train_lm.eval_loss(model, x, y))  # all validation batches at once
  print(f"dense model: full-sequence val loss {full:.4f} nats/byte over {len(x)} sequences of "
        f"{_SEQ.value} bytes; KV cache pages of {_PAGE_SIZE.value} positions, "
        f"{_SEQ.value // _PAGE_SIZE.value} per sequence and head")

  starts = np.random.default_rng(1).integers(0, len(val_data) - _PROMPT.value, _GEN_BATCH.value)
  prompts = jnp.asarray(np.stack([val_data[s:s + _PROMPT.value] for s in starts]), jnp.int32)
  key = jax.random.key(train_lm._SEED.value)  # pylint: disable=protected-access
  results = {}
  for name in dict.fromkeys(["dense", *_PATTERNS.value]):  # dense first: every row's baseline
    start = time.perf_counter()
    pattern = make_pattern(name)
    loss, recall, kv, dropped = teacher_forced(model, pattern, x, y)
    assert dropped == 0, f"{name}: the pool dropped {dropped} tokens"
    sample, speed = tokens_per_second(model, pattern, prompts, key)
    results[name] = (pattern, loss, recall, kv, speed, sample)
    print(f"  {name}: decoded and generated ({time.perf_counter() - start:.1f}s)")

  dense_loss = results["dense"][1]
  print(f"\ndense decode: teacher-forced val loss {dense_loss:.6f}, full-sequence "
        f"{full:.6f} (|difference| {abs(dense_loss - full):.1e})")
  if abs(dense_loss - full) > 1e-4:
    raise AssertionError("dense decoding with the KV cache differs from the full-sequence model")
  text = lambda b: bytes(np.asarray(b, np.uint8).tolist()).decode("utf-8", "replace")  # noqa: E731
  dense_sample = results["dense"][5]
  print(f"\ndense sample (temperature {_TEMPERATURE.value}): the prompt, then what it "
        f"generated\n{text(prompts[0])}\n--- generated ---\n{text(dense_sample[0])}\n---\n")

  _, _, _, dense_kv, dense_speed, _ = results["dense"]
  print("| pattern | val loss (teacher-forced) | vs dense | KV KiB / sequence | vs dense "
        "| pages read / step | page recall | generated tokens/s | vs dense |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, (pattern, loss, recall, kv, speed, _) in results.items():
    shown = f"{recall:.3f}" if pattern.quest else "-"
    print(f"| {name} | {loss:.4f} | {loss - dense_loss:+.4f} | {kv / 1024:.1f} | "
          f"{kv / dense_kv:.3f} | {pattern.pages} | {shown} | {speed:.0f} | "
          f"{speed / dense_speed:.2f}x |")

  if train_lm._PLOT_PATH.value:  # pylint: disable=protected-access
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (_, loss, _, kv, _, _) in results.items():
      ax.scatter(kv / 1024, loss)
      ax.annotate(name, (kv / 1024, loss), textcoords="offset points", xytext=(5, 3))
    ax.set_xlabel("KV cache at the end of a sequence (KiB, all layers)")
    ax.set_ylabel("teacher-forced val loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(train_lm._PLOT_PATH.value, dpi=120)  # pylint: disable=protected-access
    print(f"wrote {train_lm._PLOT_PATH.value}")  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
