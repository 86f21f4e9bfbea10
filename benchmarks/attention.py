r"""Block-sparse attention against dense attention, in one process.

Mask patterns: for each sequence length, head size and pattern, times the
forward pass and forward+backward (gradients of q, k and v) of every
block-sparse implementation available on the backend, beside dense attention
on the full and causal masks: `jax.nn.dot_product_attention` (XLA on CPU,
``implementation="cudnn"`` on GPU) and, on GPU, JAX's own Pallas `mha`
(`jax.experimental.pallas.ops.gpu.attention`). Prints milliseconds, effective
TFLOP/s (counting only the visible blocks) and efficiency = (this
implementation's full-layout time x density) / its sparse time, 1.0 being
ideal block skipping.

Score modifiers (`--mods`), on causal attention: packed documents (segment
ids, and the same documents as a static layout), a soft-cap `score_mod` and
attention sinks, each beside a dense baseline that computes the same thing:
`jax.nn.dot_product_attention` with a boolean mask (causal and same
document; cuDNN applies it as a bias) and, on GPU, cuDNN's packed layout
(segment lengths and offsets, through JAX's private cuDNN API) and Pallas
`mha` with segment ids; a jnp softmax for soft-cap and sinks, which
`jax.nn.dot_product_attention` does not offer. Times are divided by that
baseline's ("vs base") and by dense plain causal attention's ("vs causal").
A row that an implementation does not support yet prints n/a and the run
goes on.

  python benchmarks/attention.py                     # CPU: seq 1k and 4k; modifiers at 4k
  python benchmarks/attention.py --seqs=4096 --head_dims=64 --patterns=causal,random_1/8
  python benchmarks/attention.py --patterns= --mods=packed --doc_lens=512,1024
  python benchmarks/attention.py --json=attention.json   # every row, for device_check.py
"""

import dataclasses
import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import attention as sja
from _common import Rows, implementations, timed_rounds  # pylint: disable=g-multiple-import

_BACKEND = flags.DEFINE_string("backend", None, "cpu, gpu or tpu (default: jax's default).")
_SEQS = flags.DEFINE_list("seqs", None, "Sequence lengths (default: 1024,4096; GPU adds 16384).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head sizes.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads (kv heads = heads).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_BLOCK = flags.DEFINE_integer("block", 128, "Block size of the layouts.")
_PATTERNS = flags.DEFINE_list(
    "patterns", ["full", "causal", "local_512", "s2_shards", "bigbird", "random_1/2",
                 "random_1/4", "random_1/8", "random_1/16", "random_1/32"],
    "Mask patterns ('' for none).")
_IMPLS = flags.DEFINE_list("impls", None,
                           "Block-sparse implementations (default: all the backend has).")
_MODS = flags.DEFINE_list("mods", ["packed", "softcap", "sinks"],
                          "Score-modifier rows: packed, softcap, sinks ('' for none).")
_MOD_SEQS = flags.DEFINE_list(
    "mod_seqs", None, "Sequence lengths of the modifier rows (default: 4096 on CPU, else "
    "8192,32768).")
_MOD_HEAD_DIMS = flags.DEFINE_list(
    "mod_head_dims", None, "Head sizes of the modifier rows (default: 64 on CPU, else 128).")
_DOC_LENS = flags.DEFINE_list(
    "doc_lens", None, "Mean document lengths of the packed rows (default: 1024 on CPU, else "
    "1024,4096); lengths are uniform in [mean/2, 3 mean/2].")
_SOFTCAP = flags.DEFINE_float("softcap", 30.0, "Soft-cap: scores become cap * tanh(score / cap).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
_BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward+backward.")
_JSON = flags.DEFINE_string("json", None, "Also write every row to this JSON file "
                            "(rewritten after each row, so a killed run keeps its rows).")


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


@dataclasses.dataclass(frozen=True)
class DocumentMask(sja.Mask):
  """Query i sees key j only inside its own document: packed documents as a static layout.

  Evaluated block by block from the ids, never as a [seq, seq] table (a
  NumpyMask of seq 32k would be 1 GiB).
  """

  ids: tuple[int, ...]  # a document id per position

  @property
  def shape(self):
    return (len(self.ids), len(self.ids))

  def _eval(self, q, kv, xp):
    ids = xp.asarray(self.ids)
    return ids[q] == ids[kv]


def packed_ids(t, mean, rng):
  """Document ids of one packed sequence; lengths uniform in [mean/2, 3 mean/2], the last cut."""
  lengths = []
  while sum(lengths) < t:
    lengths.append(int(rng.integers(mean // 2, 3 * mean // 2 + 1)))
  return np.repeat(np.arange(len(lengths)), lengths)[:t].astype(np.int32)


def jax_nn(implementation, causal):
  """`jax.nn.dot_product_attention` with an optional boolean mask [batch, 1, q, kv]."""
  return lambda q, k, v, mask=None: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, implementation=implementation)


def pallas_mha(causal):
  """JAX's own Pallas GPU attention, with optional segment ids [batch, seq]."""
  def attend(q, k, v, segment_ids=None):
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
    return attention.mha(q, k, v, segment_ids=segment_ids, sm_scale=1 / math.sqrt(q.shape[-1]),
                         causal=causal)
  return attend


def cudnn_packed(q, k, v, seq_lens, offsets):
  """cuDNN's packed-sequence attention (causal within each segment), JAX's private API.

  jax.nn.dot_product_attention has no segment ids (its query/key lengths are
  padding); `jax._src.cudnn` takes per-segment lengths [batch, segments] and
  start offsets [batch, segments + 1], -1 padded.
  """
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  return cudnn.dot_product_attention(q, k, v, q_seqlen=seq_lens, kv_seqlen=seq_lens,
                                     q_offsets=offsets, kv_offsets=offsets,
                                     scale=1 / math.sqrt(q.shape[-1]),
                                     mask_type=cudnn.MaskType.PADDING_CAUSAL)


def dense_jnp(q, k, v, sinks=None, *, softcap=None):
  """Causal softmax attention in jnp with float32 scores: the baseline for soft-cap and sinks."""
  t = q.shape[1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s / math.sqrt(q.shape[-1])
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  if sinks is not None:
    m = jnp.maximum(m, sinks[None, :, None, None])
  p = jnp.exp(s - m)
  denom = p.sum(-1, keepdims=True)
  if sinks is not None:
    denom = denom + jnp.exp(sinks[None, :, None, None] - m)
  return jnp.einsum("bhqk,bkhd->bqhd", (p / denom).astype(v.dtype), v)


def measure(cases, repeats, backward):
  """Forward and forward+backward (dq, dk, dv) seconds of each `fn(*args)` in `cases`, jitted.

  All of them are timed in the same interleaved rounds (`timed_rounds`), so
  the ratios between them hold on a shared machine.

  Returns:
    a list of ``(fwd_s, fwd_bwd_s, error)``, None where it failed.
  """
  calls = []
  for fn, args in cases:
    calls.append((jax.jit(fn), args))
    if backward:
      loss = lambda *a, fn=fn: fn(*a).astype(jnp.float32).sum()  # noqa: E731
      calls.append((jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args))
  times = iter(timed_rounds(calls, repeats=repeats))
  out = []
  for _ in cases:
    (t_fwd, error), (t_bwd, error_bwd) = next(times), next(times) if backward else (None, None)
    out.append((t_fwd, t_bwd, error or error_bwd))
  return out


def dense_baselines(backend, causal):
  """(name, fn) of the dense attention to time beside the sparse implementations."""
  if backend == "gpu":
    return [("jax.nn cudnn", jax_nn("cudnn", causal)), ("pallas mha", pallas_mha(causal))]
  return [("jax.nn xla", jax_nn("xla", causal))]


def ms(seconds, width):
  return f"{1e3 * seconds:{width}.2f}" if seconds is not None else f"{'n/a':>{width}}"


def ratio(a, b, width=7):
  return f"{a / b:{width - 1}.2f}x" if a is not None and b else f"{'':>{width}}"


def pattern_rows(t, d, qkv, impls, backend, rows, opts):
  """The mask-pattern table at one sequence length and head size."""
  h, block = opts["heads"], opts["block"]
  b = qkv[0].shape[0]
  flops_full = 4.0 * b * h * t * t * d
  cases = []  # (row fields, fn)
  for causal in (False, True):
    for name, fn in dense_baselines(backend, causal):
      cases.append((dict(pattern="causal" if causal else "full", impl=name, kind="dense",
                         density=0.5 if causal else 1.0), fn))
  for pattern in opts["patterns"]:
    layout = sja.make_layout(make_mask(pattern, t, h, block), num_heads=h, block_q=block,
                             block_kv=block)
    for impl in impls:
      # The layout is a constant of the jit, as in a model (examples/train_lm.py).
      cases.append((dict(pattern=pattern, impl=impl, kind="sparse",
                         density=float(layout.density())),
                    lambda q, k, v, lay=layout, i=impl: sja.block_sparse_attention(
                        q, k, v, lay, implementation=i)))
  times = measure([(fn, qkv) for _, fn in cases], opts["repeats"], opts["backward"])
  found = [rows.add(section="patterns", seq=t, head_dim=d, **fields, fwd_s=t_fwd,
                    fwd_bwd_s=t_bwd, error=error)
           for (fields, _), (t_fwd, t_bwd, error) in zip(cases, times)]
  full_time = {r["impl"]: (r["fwd_s"], r["fwd_bwd_s"]) for r in found
               if r["kind"] == "sparse" and r["pattern"] == "full"}
  print(f"\nseq {t}, head_dim {d}")
  print(f"{'pattern':<12} {'impl':<14} {'density':>7} {'fwd ms':>9} {'TFLOP/s':>8} "
        f"{'eff':>5} | {'fwd+bwd ms':>10} {'TFLOP/s':>8} {'eff':>5}")
  for row in found:
    base = full_time.get(row["impl"], (None, None))
    density, t_fwd, t_bwd = row["density"], row["fwd_s"], row["fwd_bwd_s"]
    eff = lambda full, sparse: (  # noqa: E731
        f"{full * density / sparse:5.2f}" if full and sparse else "     ")
    tflops = lambda s, f=1.0: (  # noqa: E731
        f"{f * flops_full * density / s / 1e12:8.3f}" if s else f"{'':>8}")
    line = (f"{row['pattern']:<12} {row['impl']:<14} {density:7.3f} {ms(t_fwd, 9)} "
            f"{tflops(t_fwd)} {eff(base[0], t_fwd)}")
    if opts["backward"]:
      line += f" | {ms(t_bwd, 10)} {tflops(t_bwd, 3.5)} {eff(base[1], t_bwd)}"
    if row["error"]:
      line += f"  ({row['error'][:100]})"
    print(line, flush=True)
  dense_full = found[0]["fwd_s"]
  for row in found:
    if (backend == "cpu" and row["impl"] == "xla" and row["pattern"] == "random_1/8"
        and t == 4096 and row["fwd_s"] and dense_full):
      print(f"target (CPU, xla, density {row['density']:.3f}, seq 4096): "
            f"{row['fwd_s'] / dense_full:.3f}x the dense full-attention forward time "
            "(goal <= 0.2)")


def mod_groups(t, impls, backend, opts, batch):
  """(group, [(row fields, fn, extra args)]): the rows of each score modifier, dense base first."""
  h, block = opts["heads"], opts["block"]
  causal_layout = sja.make_layout(sja.CausalMask((t, t)), num_heads=h, block_q=block,
                                  block_kv=block)
  causal_density = float(causal_layout.density())
  dense_name, dense_causal = dense_baselines(backend, True)[0]
  row = lambda name, impl, kind, density: dict(pattern=name, impl=impl, kind=kind,  # noqa: E731
                                               density=density)

  def sparse(impl, layout=causal_layout, **kwargs):
    return lambda q, k, v: sja.block_sparse_attention(q, k, v, layout, implementation=impl,
                                                      **kwargs)

  yield "causal", ([(row("causal", name, "dense", 0.5), fn, ())
                    for name, fn in dense_baselines(backend, True)]
                   + [(row("causal", impl, "sparse", causal_density), sparse(impl), ())
                      for impl in impls])
  rng = np.random.default_rng(t)
  for mean in (opts["doc_lens"] if "packed" in opts["mods"] else []):
    ids = packed_ids(t, mean, rng)
    group = f"docs {mean}"
    mask = np.tril(ids[:, None] == ids[None, :])
    batch_ids = jnp.asarray(np.tile(ids, (batch, 1)))
    cases = [(row(group, f"{dense_name} mask", "dense", float(mask.mean())), dense_causal,
              (jnp.asarray(np.broadcast_to(mask, (batch, 1, t, t))),))]
    if backend == "gpu":
      starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
      cases += [(row(group, "cudnn packed", "dense", float(mask.mean())), cudnn_packed,
                 (jnp.asarray(np.tile(np.diff(np.r_[starts, t]), (batch, 1)), jnp.int32),
                  jnp.asarray(np.tile(np.r_[starts, -1], (batch, 1)), jnp.int32))),
                (row(group, "pallas mha ids", "dense", float(mask.mean())), pallas_mha(True),
                 (batch_ids,))]
    seg_density = float(sja.segment_layout(causal_layout, batch_ids).density())
    cases += [(row(f"{group}, ids", impl, "sparse", seg_density),
               lambda q, k, v, ids, i=impl: sja.block_sparse_attention(
                   q, k, v, causal_layout, q_segment_ids=ids, implementation=i), (batch_ids,))
              for impl in impls]
    doc_layout = sja.make_layout(sja.CausalMask((t, t)) & DocumentMask(tuple(ids.tolist())),
                                 num_heads=h, block_q=block, block_kv=block)
    cases += [(row(f"{group}, layout", impl, "sparse", float(doc_layout.density())),
               sparse(impl, doc_layout), ()) for impl in impls]
    yield group, cases
  if "softcap" in opts["mods"]:
    cap = opts["softcap"]
    group = f"softcap {cap:g}"
    yield group, ([(row(group, "jnp", "dense", 0.5),
                    lambda q, k, v: dense_jnp(q, k, v, softcap=cap), ())]
                  + [(row(group, impl, "sparse", causal_density),
                      sparse(impl, score_mod=lambda s, *_: cap * jnp.tanh(s / cap)), ())
                     for impl in impls])
  if "sinks" in opts["mods"]:
    sinks = (jnp.asarray(np.random.default_rng(1).standard_normal(h, np.float32)),)
    yield "sinks", ([(row("sinks", "jnp", "dense", 0.5), dense_jnp, sinks)]
                    + [(row("sinks", impl, "sparse", causal_density),
                        lambda q, k, v, s, i=impl: sja.block_sparse_attention(
                            q, k, v, causal_layout, sinks=s, implementation=i), sinks)
                       for impl in impls])


def mod_rows(t, d, qkv, impls, backend, rows, opts):
  """Packed documents, soft-cap and sinks at one sequence length and head size.

  Each group is timed in rounds of its own with dense causal attention
  beside it, so "vs causal" holds within the group as "vs base" does.
  """
  backward = opts["backward"]
  dense_name, dense_causal = dense_baselines(backend, True)[0]
  print(f"\nscore modifiers: seq {t}, head_dim {d}, causal; vs base = / the group's first "
        f"(dense) row, vs causal = / dense causal {dense_name}")
  print(f"{'rows':<20} {'impl':<16} {'density':>7} {'fwd ms':>9} {'vs base':>7} "
        f"{'vs causal':>9} | {'f+b ms':>9} {'vs base':>7} {'vs causal':>9}")
  for group, cases in mod_groups(t, impls, backend, opts, qkv[0].shape[0]):
    if group != "causal":  # the reference, timed again in this group's rounds
      cases = [(None, dense_causal, ())] + cases
    times = measure([(fn, tuple(qkv) + tuple(extra)) for _, fn, extra in cases],
                    opts["repeats"], backward)
    causal_fwd, causal_bwd, _ = times[0]
    if group != "causal":
      cases, times = cases[1:], times[1:]
    base_fwd, base_bwd, _ = times[0]
    for (fields, _, _), (t_fwd, t_bwd, error) in zip(cases, times):
      rows.add(section="mods", seq=t, head_dim=d, group=group, **fields, fwd_s=t_fwd,
               fwd_bwd_s=t_bwd, error=error, causal_fwd_s=causal_fwd,
               causal_fwd_bwd_s=causal_bwd)
      line = (f"{fields['pattern']:<20} {fields['impl']:<16} {fields['density']:7.3f} "
              f"{ms(t_fwd, 9)} {ratio(t_fwd, base_fwd)} {ratio(t_fwd, causal_fwd, 9)}")
      if backward:
        line += (f" | {ms(t_bwd, 9)} {ratio(t_bwd, base_bwd)} "
                 f"{ratio(t_bwd, causal_bwd, 9)}")
      if error:
        line += f"  ({error[:100]})"
      print(line, flush=True)


def main(argv):
  del argv
  backend = _BACKEND.value or jax.default_backend()
  on_cpu = backend == "cpu"
  seqs = [int(s) for s in (_SEQS.value or (["1024", "4096"] + (["16384"] if backend == "gpu"
                                                                 else [])))]
  mod_seqs = [int(s) for s in (_MOD_SEQS.value or (["4096"] if on_cpu else ["8192", "32768"]))]
  mod_dims = [int(s) for s in (_MOD_HEAD_DIMS.value or (["64"] if on_cpu else ["128"]))]
  impls = _IMPLS.value or implementations(backend)
  opts = dict(heads=_HEADS.value, block=_BLOCK.value, repeats=_REPEATS.value,
              backward=_BACKWARD.value, patterns=_PATTERNS.value, mods=_MODS.value,
              softcap=_SOFTCAP.value,
              doc_lens=[int(s) for s in (_DOC_LENS.value or (["1024"] if on_cpu
                                                             else ["1024", "4096"]))])
  b, h = _BATCH.value, _HEADS.value
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  kind = jax.devices()[0].device_kind
  print(f"{backend} ({kind}), jax {jax.__version__}; batch {b}, heads {h}, block "
        f"{opts['block']}, {jnp.dtype(dtype).name}, median of {opts['repeats']}")
  rows = Rows(_JSON.value, backend=backend, device_kind=kind, jax=jax.__version__,
              dtype=jnp.dtype(dtype).name, batch=b, heads=h, block=opts["block"],
              repeats=opts["repeats"], impls=impls)
  rng = np.random.default_rng(0)
  for section, lens, dims, table in [("patterns", seqs, [int(x) for x in _HEAD_DIMS.value],
                                      pattern_rows), ("mods", mod_seqs, mod_dims, mod_rows)]:
    if not (opts["patterns"] if section == "patterns" else opts["mods"]):
      continue
    for t in lens:
      for d in dims:
        # Host random values: jax.random would compile for every new shape.
        qkv = tuple(jnp.asarray(rng.standard_normal((b, t, h, d), np.float32), dtype)
                    for _ in range(3))
        table(t, d, qkv, impls, backend, rows, opts)


if __name__ == "__main__":
  app.run(main)
