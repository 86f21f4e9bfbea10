r"""Trains small byte-level transformer LMs with sparse attention and sparse FFNs.

A decoder-only transformer (flax nnx) learns to predict the next byte of a
text corpus. Each configuration swaps one part for a sparse one and is
trained from the same initialization on the same batches:

* attention, through `sparsejax.attention` (block size `--block`):
  dense (`jax.nn.dot_product_attention`, causal), `local` (causal window of
  `--window` tokens), `s2` (S2-Attention strided shards with a local
  window), `bigbird` (global + window + random blocks, causal) and `topk`
  (each query block reads the `--k_blocks` key blocks with the largest pooled
  scores, routed per batch and head inside jit);
* FFN weights, through `sj.sparsify`: `rigl` (unstructured RigL),
  `n_m` (2:4 with SR-STE) and `block` (`sj.nn.BlockSparseLinear` with
  block RigL, run block-sparse after training).

The default corpus is Python source from the standard library (it ships with
every Python, nothing is downloaded); `--text_file` trains on your own text.
With `--documents`, the corpus is cut into documents (blocks of source
between blank lines, a few hundred bytes each) packed back to back with a
separator byte, and every attention kind attends within its document only:
the model derives segment ids from the separators and passes them to
`block_sparse_attention` (dense attention gets the equivalent boolean mask).
The script prints validation loss per configuration beside dense, with the
attention density each used, and writes the loss curves to a PNG.

  python examples/train_lm.py                                   # every configuration
  python examples/train_lm.py --attention=dense,s2 --ffn=dense  # a subset
  python examples/train_lm.py --text_file=my_corpus.txt --steps=2000
"""

import functools
import os
import sys
import sysconfig
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from sparsejax import attention as sja
from _common import sparse_view, train_step  # pylint: disable=g-multiple-import

ATTENTION = ("dense", "local", "s2", "bigbird", "topk")
FFN = ("dense", "rigl", "n_m", "block")

_ATTENTION = flags.DEFINE_list("attention", list(ATTENTION), f"Attention kinds of {ATTENTION}.")
_FFN = flags.DEFINE_list("ffn", list(FFN), f"FFN kinds of {FFN} (each with dense attention).")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Train on this text file instead.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per configuration.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length (a multiple of --block).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_DIM = flags.DEFINE_integer("dim", 128, "Model width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer blocks.")
_BLOCK = flags.DEFINE_integer("block", 16, "Attention block size.")
_WINDOW = flags.DEFINE_integer("window", 32, "Local attention window (tokens).")
_K_BLOCKS = flags.DEFINE_integer("k_blocks", 3, "Key blocks per query block for topk.")
_FFN_SPARSITY = flags.DEFINE_float("ffn_sparsity", 0.75, "Sparsity of rigl and block FFNs.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (adam).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Validation batches.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_PLOT_PATH = flags.DEFINE_string("plot_path", "train_lm.png", "Loss-curve PNG ('' for none).")
_DOCUMENTS = flags.DEFINE_bool("documents", False, "Packed documents: attend within each only.")

SEPARATOR = 0  # the byte between packed documents (never in text)

_FFN_BLOCK = (16, 16)  # tile of the block-sparse FFN

# Standard-library modules whose source makes the default corpus (~1 MB).
_CORPUS_MODULES = ("argparse", "collections/__init__", "dataclasses", "difflib", "enum",
                   "functools", "inspect", "pathlib", "pydoc", "random", "statistics",
                   "string", "textwrap", "typing")


def load_corpus(path):
  """The corpus as uint8 bytes: a text file, or standard-library source."""
  if path:
    with open(path, "rb") as f:
      data = f.read()
  else:
    stdlib = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(stdlib, m + ".py"), "rb").read()  # pylint: disable=consider-using-with
                    for m in _CORPUS_MODULES if os.path.exists(os.path.join(stdlib, m + ".py")))
  if _DOCUMENTS.value:  # documents: blocks between blank lines, packed with a separator
    documents = [d for d in data.replace(bytes([SEPARATOR]), b"").split(b"\n\n") if d.strip()]
    data = bytes([SEPARATOR]).join(documents)
  if len(data) < 20 * (_SEQ.value + 1):
    raise app.UsageError(f"the corpus has {len(data)} bytes; need at least {20 * (_SEQ.value + 1)}")
  return np.frombuffer(data, np.uint8)


def split_corpus(data):
  """(training bytes, validation bytes, validation batches): the split every LM example uses."""
  train_data, val_data = np.split(data, [int(0.9 * len(data))])
  return train_data, val_data, list(batches(val_data, np.random.default_rng(12345),
                                            _EVAL_BATCHES.value))


def batches(data, rng, count):
  """`count` random windows of seq + 1 bytes: inputs and next-byte targets."""
  starts = rng.integers(0, len(data) - _SEQ.value - 1, (count, _BATCH.value))
  for row in starts:
    window = np.stack([data[s:s + _SEQ.value + 1] for s in row]).astype(np.int32)
    yield window[:, :-1], window[:, 1:]


def attention_layout(kind):
  """The static layout of an attention kind (None for dense and topk)."""
  t, h, b = _SEQ.value, _HEADS.value, _BLOCK.value
  causal = sja.CausalMask((t, t))
  if kind == "local":
    mask = causal & sja.LocalMask((t, t), (_WINDOW.value, 0))
  elif kind == "s2":
    mask = sja.StridedShardMask.for_heads((t, t), h, block=b, num_shards=4, local_window=b)
  elif kind == "bigbird":
    mask = sja.BigBirdMask((t, t), block=b, num_global=1, window=1, num_random=1, causal=True)
  else:
    return None
  return sja.make_layout(mask, num_heads=h, block_q=b, block_kv=b)


def attention_density(kind, tokens=None):
  """Share of block pairs computed; with documents, averaged over the `tokens` batch."""
  n = _SEQ.value // _BLOCK.value
  if tokens is not None and kind != "topk":
    t = _SEQ.value
    layout = attention_layout(kind) or sja.make_layout(
        sja.CausalMask((t, t)), num_heads=_HEADS.value, block_q=_BLOCK.value,
        block_kv=_BLOCK.value)
    ids = jnp.cumsum(jnp.asarray(tokens) == SEPARATOR, axis=1)
    return float(sja.segment_layout(layout, ids).density())
  if kind == "dense":
    return (n + 1) / (2 * n)  # causal blocks: on and below the diagonal
  if kind == "topk":
    return min(_K_BLOCKS.value, n) / n
  return float(attention_layout(kind).density())


class Attention(nnx.Module):

  def __init__(self, kind, rngs):
    d = _DIM.value
    self.kind = kind
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x, segment_ids=None):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * _HEADS.value, d // _HEADS.value), 3, axis=2)
    if self.kind == "dense" and segment_ids is None:
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    elif self.kind == "dense":  # causal & same document, as a dense boolean mask
      same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
      o = jax.nn.dot_product_attention(q, k, v, mask=same & jnp.tril(jnp.ones((t, t), bool)))
    else:
      if self.kind == "topk":
        layout = sja.topk_layout(q, k, block_q=_BLOCK.value, block_kv=_BLOCK.value,
                                 k_blocks=_K_BLOCKS.value, causal=True)
      else:
        layout = attention_layout(self.kind)  # host-side and cached: a constant under jit
      o = sja.block_sparse_attention(q, k, v, layout, q_segment_ids=segment_ids)
    return self.out(o.reshape(b, t, d))


# FFN activations: GELU, ReLU² and Q-Sparse's top-k (a quarter of the units, straight-through).
ACTIVATIONS = {"gelu": jax.nn.gelu, "relu2": sj.activations.relu2,
               "topk": lambda h: sj.activations.topk(jax.nn.gelu(h), 0.25)}


class TransformerBlock(nnx.Module):

  def __init__(self, attention, ffn, rngs, activation="gelu"):
    d = _DIM.value
    self.activation = ACTIVATIONS[activation]
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attention = Attention(attention, rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    if ffn == "block":
      linear = functools.partial(sj.nn.BlockSparseLinear, block_shape=_FFN_BLOCK)
    else:
      linear = nnx.Linear
    self.up = linear(d, 4 * d, rngs=rngs)
    self.down = linear(4 * d, d, rngs=rngs)

  def __call__(self, x, segment_ids=None):
    x = x + self.attention(self.norm1(x), segment_ids)
    return x + self.down(self.activation(self.up(self.norm2(x))))


class LM(nnx.Module):
  """A decoder-only byte-level transformer."""

  def __init__(self, attention, ffn, rngs, activation="gelu"):
    d = _DIM.value
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (_SEQ.value, d)))
    self.blocks = nnx.List([TransformerBlock(attention, ffn, rngs, activation)
                            for _ in range(_LAYERS.value)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[...][None]
    # Packed documents: a separator starts the next document.
    segment_ids = jnp.cumsum(tokens == SEPARATOR, axis=1) if _DOCUMENTS.value else None
    for block in self.blocks:
      x = block(x, segment_ids)
    return self.embed.attend(self.norm(x))


def make_optimizer(model, ffn):
  steps = _STEPS.value
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, _LEARNING_RATE.value, steps // 10,
                                                      steps), weight_decay=0.01)
  key, where = jax.random.key(_SEED.value), r"(up|down)/kernel"
  if ffn in ("rigl", "block"):  # block: RigL over whole FFN tiles
    granularity = sj.Block(_FFN_BLOCK) if ffn == "block" else None
    tx = sj.sparsify(tx, sj.rigl(_FFN_SPARSITY.value, end_step=3 * steps // 4,
                                 update_every=max(steps // 20, 1), distribution="uniform",
                                 granularity=granularity, key=key), where=where)
  elif ffn == "n_m":
    tx = sj.sparsify(tx, sj.n_m(2, 4, axis=-2, estimator="sr_ste"), where=where)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def eval_loss(model, x, y):
  return cross_entropy(model, x, y)


def run(attention, ffn, train_data, val_batches, activation="gelu"):
  """Trains one configuration; returns (val loss, FFN weight sparsity, loss curve, model)."""
  model = LM(attention, ffn, nnx.Rngs(_SEED.value), activation)
  optimizer = make_optimizer(model, ffn)
  rng = np.random.default_rng(_SEED.value)
  curve, start, width = [], time.perf_counter(), 30
  label = ffn if activation == "gelu" else activation
  for i, (x, y) in enumerate(batches(train_data, rng, _STEPS.value), 1):
    loss = train_step(model, optimizer, x, y, ffn == "n_m")
    if i % 10 == 0 or i == _STEPS.value:
      curve.append((i, float(loss)))
      done = width * i // _STEPS.value
      sys.stdout.write(f"\r  attention={attention:<7} ffn={label:<5} [{'#' * done}{'.' * (width - done)}]"
                       f" {i}/{_STEPS.value} loss {float(loss):.3f} "
                       f"{time.perf_counter() - start:5.1f}s")
      sys.stdout.flush()
  model = sparse_view(model, optimizer, ffn == "n_m")
  val = float(np.mean([eval_loss(model, x, y) for x, y in val_batches]))
  note = ""
  if ffn == "block":  # after training: compute only the kept tiles
    sj.nn.to_block_sparse(model)
    converted = float(np.mean([eval_loss(model, x, y) for x, y in val_batches]))
    note = f"block-sparse inference: val loss {converted:.4f}"
  kernels = [np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if path[-2:] in (("up", "kernel"), ("down", "kernel"))]
  ffn_sparsity = 1 - sum(np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)
  print(f"\r  attention={attention:<7} ffn={label:<5} val loss {val:.4f}  "
        f"({time.perf_counter() - start:.1f}s) {note}" + " " * 20)
  return val, ffn_sparsity, curve, model


def main(argv):
  del argv
  for name, values, allowed in [("attention", _ATTENTION.value, ATTENTION),
                                ("ffn", _FFN.value, FFN)]:
    if not values or any(v not in allowed for v in values):
      raise app.UsageError(f"--{name} takes a list of {allowed}, got {values}")
  if _SEQ.value % _BLOCK.value or _DIM.value % 16 or _DIM.value % _HEADS.value:
    raise app.UsageError("--seq must be a multiple of --block, and --dim of 16 and of --heads")
  data = load_corpus(_TEXT_FILE.value)
  train_data, _, val_batches = split_corpus(data)
  source = _TEXT_FILE.value or "Python standard-library source"
  print(f"{source}: {len(data) / 1e6:.2f} MB; byte-level LM, {_LAYERS.value} blocks, width "
        f"{_DIM.value}, {_HEADS.value} heads, seq {_SEQ.value}, batch {_BATCH.value}, "
        f"{_STEPS.value} steps per configuration")
  if _DOCUMENTS.value:
    count = int(np.sum(data == SEPARATOR)) + 1
    print(f"packed documents: {count}, mean length {len(data) / count:.0f} bytes; attention "
          "within each document (density below: over the first validation batch)")

  configs = [(a, "dense") for a in _ATTENTION.value]
  configs += [("dense", f) for f in _FFN.value if f != "dense"]
  if ("dense", "dense") not in configs:
    configs.insert(0, ("dense", "dense"))  # the baseline every row is compared with
  results = {c: run(*c, train_data, val_batches) for c in configs}

  base = results[("dense", "dense")][0]
  print("\n| attention | attention density | FFN | FFN sparsity | val loss | vs dense |")
  print("| --- | ---: | --- | ---: | ---: | ---: |")
  for (attention, ffn), (val, sparsity, *_) in results.items():
    density = attention_density(attention, val_batches[0][0] if _DOCUMENTS.value else None)
    print(f"| {attention} | {density:.3f} | {ffn} | {sparsity:.3f} | "
          f"{val:.4f} | {val - base:+.4f} |")

  if _PLOT_PATH.value:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4))
    for (attention, ffn), (_, _, curve, _) in results.items():
      steps, losses = zip(*curve)
      ax.plot(steps, losses, label=f"attention {attention}, ffn {ffn}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(_PLOT_PATH.value, dpi=120)
    print(f"wrote {_PLOT_PATH.value}")


if __name__ == "__main__":
  app.run(main)
