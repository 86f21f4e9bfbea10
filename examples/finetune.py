r"""Sparse fine-tuning: a new task over a pretrained model, the digits MLP or a byte-level LM.

With `--model=digits` (the default) an MLP (64-256-256-10, one 10-way head)
is pretrained on scikit-learn's bundled digits 0-4 only, then fine-tuned on
5-9. With `--model=lm` the byte-level transformer of `train_lm.py` is
pretrained on Python standard-library source (train_lm's corpus, or
`--text_file`), then fine-tuned on the Python reference documentation as
`help()` shows it (`pydoc_data.topics`, which ships with Python too): English
prose with a few code samples. From the same base, with the same Adam, steps
and batches, by:

* full: every parameter (the dense reference);
* lora: a minimal params-level LoRA written here, each kernel W [m, n] read as
  W + A @ B with only A [m, r] and B [r, n] trained;
* spiel, lt_sft, s2ft: `sj.finetune.sparse_delta` with those selectors (LT-SFT
  first runs a full fine-tune of a fifth of the steps, counted in its time;
  S2FT takes whole rows, the inputs of each kernel);
* sparse_lowrank: a sparse delta plus a low-rank term per kernel (DSEE,
  SLTrain), the budget split in half between the two.

Every method but full trains about `--density` of the kernels' entries (LoRA
and the low-rank term at the rank closest to that budget): the MLP's, or the
LM's attention and FFN kernels (not its embedding, positions or norms). The
table gives the accuracy (digits) or validation loss in nats/byte (LM) on
the new task, on the old one (forgetting) and the optimizer state's bytes.
For the digits, two SpIEL deltas from the base, one that goes on training on
0-4 and one on 5-9, are then merged with `sj.finetune.merge` (sum and
average), and so are two full fine-tunes as task vectors, to measure the
interference. The LM takes train_lm's model flags (`--dim`, `--seq`,
`--batch`, ...), with a shorter `--seq` by default here; it is pretrained on
every run (plain Adam, about 15% of the run), and its nnx Params are trained
as a plain dict (`nnx.split`, `State.to_pure_dict`; `nnx.merge` takes the dict
back for the loss), so one jitted scan trains both models.

References: Scaling Sparse Fine-Tuning to Large Language Models (SpIEL).
Ansell et al., 2024. arXiv:2401.16405. LoRA: Low-Rank Adaptation of Large
Language Models. Hu et al., 2021. arXiv:2106.09685. Editing Models with Task
Arithmetic. Ilharco et al., 2023. arXiv:2212.04089.

  python examples/finetune.py                    # ~25 s on 2 CPU cores
  python examples/finetune.py --model=lm         # ~2 min on 2 CPU cores
  python examples/finetune.py --density=0.01 --methods=full,lora,spiel --plot_path=''
"""

import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
import train_lm  # the LM, its corpora and flags (--steps, --seed, --learning_rate, ...)
from _common import init_mlp, load_data, mlp_logits  # pylint: disable=g-multiple-import

# train_lm's flags, shared by both models: --steps counts fine-tuning steps.
flags.FLAGS.set_default("steps", 400)
flags.FLAGS.set_default("learning_rate", 2e-3)
flags.FLAGS.set_default("plot_path", "finetune.png")
flags.FLAGS.set_default("seq", 64)  # the LM's (train_lm: 128), for a run of about 2 minutes

MODELS = ("digits", "lm")
METHODS = ("full", "lora", "spiel", "lt_sft", "s2ft", "sparse_lowrank")
_MODEL = flags.DEFINE_enum("model", "digits", MODELS, "The digits MLP or train_lm's LM.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Fine-tuning methods, of {METHODS}.")
_DENSITY = flags.DEFINE_float("density", 0.03, "Trainable share of the kernels' entries.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 600,
                                       "Pretraining steps (on 0-4, or on the source).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size of the digits (LM: --batch).")
# pylint: disable-next=protected-access
_STEPS, _SEED, _LEARNING_RATE = train_lm._STEPS, train_lm._SEED, train_lm._LEARNING_RATE
_PLOT_PATH = train_lm._PLOT_PATH  # pylint: disable=protected-access

_SIZES = (64, 256, 256, 10)
_LM_KERNELS = r"(qkv|out|up|down)/kernel"  # the attention and FFN kernels of train_lm.LM


class Task(NamedTuple):
  """A model pretrained on an old task and what fine-tuning it on a new one needs."""

  base: Any  # the pretrained params, a plain pytree
  loss: Callable[[Any, Any], jax.Array]  # loss(params, batch)
  where: str  # path pattern of the kernels the sparse methods and LoRA tune
  batches: Any  # the new task's [steps, batch, ...] inputs and targets
  evaluate: Callable[[Any], tuple[float, float]]  # params -> (new task, old task)
  names: tuple[str, str]  # the new task and the old: ("5-9", "0-4")
  metric: str  # what evaluate measures: "acc" or "loss"


_YLABEL = {"acc": "test accuracy", "loss": "validation loss (nats/byte)"}


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(mlp_logits(params, x), -1) == y)


def mlp_loss(params, batch):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_logits(params, batch[0]),
                                                         batch[1]).mean()


def train(tx, trainable, batches, loss, to_params=lambda t: t):
  """Steps of `tx` on `loss(params, batch)` over `batches` ([steps, ...]) in one jitted scan.

  `to_params` maps what is trained to the model's params (LoRA's factors to
  W + A @ B); returns the trained pytree and the optimizer state.
  """
  def step(carry, batch):
    trainable, state = carry
    grads = jax.grad(lambda t: loss(to_params(t), batch))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return (optax.apply_updates(trainable, updates), state), None

  run = jax.jit(lambda t, b: jax.lax.scan(step, (t, tx.init(t)), b)[0])
  return jax.block_until_ready(run(trainable, batches))


def kernels(params, where):
  """(chosen, kernels): which leaves of `params` the path pattern `where` selects, and those."""
  select = sj.path_pattern(where)
  chosen = [bool(select(path, x)) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  return chosen, [x for x, c in zip(jax.tree.leaves(params), chosen) if c]


def lora(base, where, rank, key):
  """A params-level LoRA on the kernels `where` selects: (factors, to_params).

  A starts random (scaled 1/sqrt(m), as `sparse_delta`'s low-rank term) and B
  at zero, so training starts at the base.
  """
  chosen, tuned = kernels(base, where)
  keys = iter(jax.random.split(key, len(tuned)))

  def factor(w):
    m, n = w.shape
    return {"a": jax.random.normal(next(keys), (m, rank)) / np.sqrt(m), "b": jnp.zeros((rank, n))}

  factors = jax.tree.unflatten(jax.tree.structure(base), [  # None at the leaves not tuned
      factor(w) if c else None for w, c in zip(jax.tree.leaves(base), chosen)])

  def to_params(factors):
    return jax.tree.map(lambda w, f: w if f is None else w + f["a"] @ f["b"], base, factors)

  return factors, to_params


def budget_rank(base, where, entries):
  """The rank r whose factors over every kernel, r * (m + n) each, come closest to `entries`."""
  return max(1, round(entries / sum(sum(w.shape) for w in kernels(base, where)[1])))


def size(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def deltas(delta):
  return jax.tree.leaves(delta, is_leaf=lambda x: isinstance(x, sj.finetune.SparseDelta))


def entries(delta):
  """Trainable entries of a delta: its values and low-rank factors, not its indices."""
  return sum(size([d.values, d.a, d.b]) for d in deltas(delta))


def finetune(name, task, batches, key):
  """Fine-tunes `task.base` by method `name`: (params, trainable entries, optimizer state)."""
  adam = optax.adam(_LEARNING_RATE.value)
  base, where = task.base, task.where
  density, steps = _DENSITY.value, len(jax.tree.leaves(batches)[0])
  total = size(kernels(base, where)[1])
  if name == "full":
    params, state = train(adam, base, batches, task.loss)
    return params, size(base), state
  if name == "lora":
    factors, to_params = lora(base, where, budget_rank(base, where, density * total), key)
    factors, state = train(adam, factors, batches, task.loss, to_params)
    return to_params(factors), size(factors), state
  spiel = lambda d: sj.finetune.spiel(d, update_every=max(steps // 10, 1), key=key,  # noqa: E731
                                      end_step=3 * steps // 4)
  extra = {}
  if name == "spiel":
    selector = spiel(density)
  elif name == "lt_sft":
    short, _ = train(adam, base, jax.tree.map(lambda b: b[:max(steps // 5, 1)], batches),
                     task.loss)
    selector = sj.finetune.lt_sft(density, finetuned=short)
  elif name == "s2ft":
    # Rows (a kernel's inputs): with the default axis=-1 the digits' 10-way
    # head would get the column of one class only, and 5-9 accuracy stays 0.
    selector = sj.finetune.s2ft(density, key=key, axis=0)
  elif name == "sparse_lowrank":  # half the budget sparse, half in rank-r factors
    selector = spiel(density / 2)
    extra = {"rank": budget_rank(base, where, density * total / 2),
             "key": jax.random.fold_in(key, 1)}
  else:
    raise app.UsageError(f"unknown method {name!r}; expected one of {METHODS}")
  tx = sj.finetune.sparse_delta(adam, selector, where=where, **extra)
  params, state = train(tx, base, batches, task.loss)
  return params, entries(sj.finetune.get_delta(state)), state


def task_batches(x, y, steps, seed):
  """The same `steps` batches of (x, y) for every method."""
  idx = np.random.default_rng(seed).integers(0, len(x), (steps, _BATCH_SIZE.value))
  return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def digits_task(key):
  """The MLP pretrained on 0-4 and fine-tuned on 5-9; and the 0-4 batches to merge with."""
  x_train, y_train, x_test, y_test = load_data("digits", seed=_SEED.value)
  old, new = y_train < 5, y_train >= 5
  old_batches = task_batches(x_train[old], y_train[old], _STEPS.value, _SEED.value + 1)
  new_batches = task_batches(x_train[new], y_train[new], _STEPS.value, _SEED.value + 2)
  new_test, old_test = [(x_test[t], y_test[t]) for t in (y_test >= 5, y_test < 5)]
  base, _ = train(optax.adam(_LEARNING_RATE.value), init_mlp(key, _SIZES),
                  task_batches(x_train[old], y_train[old], _PRETRAIN_STEPS.value, _SEED.value),
                  mlp_loss)
  evaluate = lambda p: (float(accuracy(p, *new_test)), float(accuracy(p, *old_test)))  # noqa: E731
  return Task(base, mlp_loss, "kernel", new_batches, evaluate, ("5-9", "0-4"), "acc"), old_batches


def docs_corpus():
  """The Python reference documentation `help()` shows, as uint8 bytes (ships with Python)."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return np.frombuffer("\n\n".join(topics[k] for k in sorted(topics)).encode(), np.uint8)


def lm_task():
  """train_lm's LM pretrained on library source and fine-tuned on the documentation."""
  text_file = train_lm._TEXT_FILE.value  # pylint: disable=protected-access
  if train_lm._DIM.value % train_lm._HEADS.value:  # pylint: disable=protected-access
    raise app.UsageError("--dim must be a multiple of --heads")
  source, docs = train_lm.load_corpus(text_file), docs_corpus()
  (source_train, _, source_val), (docs_train, _, docs_val) = map(train_lm.split_corpus,
                                                                 (source, docs))
  print(f"pretraining corpus: {text_file or 'Python standard-library source'}, "
        f"{len(source) / 1e6:.2f} MB; fine-tuning corpus: the "
        f"Python reference documentation (pydoc_data.topics), {len(docs) / 1e6:.2f} MB")
  model = train_lm.LM("dense", "dense", nnx.Rngs(_SEED.value))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  as_model = lambda p: nnx.merge(graphdef, p, rest)  # noqa: E731
  loss = lambda p, batch: train_lm.cross_entropy(as_model(p), *batch)  # noqa: E731

  def stack(data, steps, seed):  # [steps, batch, seq] inputs and targets
    windows = train_lm.batches(data, np.random.default_rng(seed), steps)
    return tuple(jnp.asarray(np.stack(b)) for b in zip(*windows))

  def val(p, batches):
    return float(np.mean([train_lm.eval_loss(as_model(p), x, y) for x, y in batches]))

  base, _ = train(optax.adam(_LEARNING_RATE.value), params.to_pure_dict(),
                  stack(source_train, _PRETRAIN_STEPS.value, _SEED.value), loss)
  return Task(base, loss, _LM_KERNELS, stack(docs_train, _STEPS.value, _SEED.value + 2),
              lambda p: (val(p, docs_val), val(p, source_val)), ("docs", "source"), "loss")


def merging(task, runs, old_batches, key):
  """Merges 0-4 and 5-9 deltas from one base, sparse (SpIEL) and dense (task vectors)."""
  base, both, tune_key = task.base, task.evaluate, jax.random.fold_in(key, 1)

  def tuned(name, t):  # each task from its own random SpIEL support
    if t == "5-9":
      return runs[name] if name in runs else finetune(name, task, task.batches, tune_key)
    return finetune(name, task, old_batches, jax.random.fold_in(key, 2))

  spiel_04, spiel_59 = [sj.finetune.get_delta(tuned("spiel", t)[2]) for t in ("0-4", "5-9")]
  full_04, full_59 = [tuned("full", t)[0] for t in ("0-4", "5-9")]
  tasks = lambda w04, w59: jax.tree.map(  # noqa: E731
      lambda b, a, c: b + w04 * (a - b) + w59 * (c - b), base, full_04, full_59)
  merges = {
      "spiel 0-4 delta": sj.finetune.merge(base, spiel_04),
      "spiel 5-9 delta": sj.finetune.merge(base, spiel_59),
      "spiel sum": sj.finetune.merge(base, spiel_04, spiel_59),
      "spiel average": sj.finetune.merge(base, spiel_04, spiel_59, weights=(0.5, 0.5)),
      "full 0-4 task vector": tasks(1.0, 0.0), "full 5-9 task vector": tasks(0.0, 1.0),
      "full sum": tasks(1.0, 1.0), "full average": tasks(0.5, 0.5)}
  shared = sum(int(np.intersect1d(a.indices, b.indices).size)
               for a, b in zip(deltas(spiel_04), deltas(spiel_59)))
  print(f"\nmerging ({shared} of {entries(spiel_59)} SpIEL "
        f"entries shared by the two deltas)\n\n| model | 5-9 acc | 0-4 acc | mean |\n"
        f"| --- | ---: | ---: | ---: |\n| base | {both(base)[0]:.4f} | {both(base)[1]:.4f} | "
        f"{np.mean(both(base)):.4f} |")
  merged = {name: both(params) for name, params in merges.items()}
  for name, (new_acc, old_acc) in merged.items():
    print(f"| {name} | {new_acc:.4f} | {old_acc:.4f} | {(new_acc + old_acc) / 2:.4f} |")
  return merged


def bars(ax, labels, values, names, ylabel):
  """Grouped bars of (new, old) per label, with room above for the legend."""
  at = np.arange(len(labels))
  ax.bar(at - 0.2, [v[0] for v in values], 0.4, label=f"{names[0]} (new)")
  ax.bar(at + 0.2, [v[1] for v in values], 0.4, label=f"{names[1]} (old)")
  ax.set_xticks(at, labels, rotation=30, ha="right")
  ax.set_ylim(0, 1.15 * max(1.0, *[max(v) for v in values]))
  ax.set_ylabel(ylabel)
  ax.legend(loc="upper center", ncol=2)


def main(argv):
  del argv
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
  key = jax.random.key(_SEED.value)
  start = time.perf_counter()
  if _MODEL.value == "digits":
    task, old_batches = digits_task(key)
  else:
    task, old_batches = lm_task(), None
  base, (new_task, old_task) = task.base, task.names
  new_name, old_name = f"{new_task} {task.metric}", f"{old_task} {task.metric}"
  total, (new, old) = size(kernels(base, task.where)[1]), task.evaluate(base)
  print(f"base (pretrained on {old_task} for {_PRETRAIN_STEPS.value} steps): "
        f"{new_name} {new:.4f}, {old_name} {old:.4f}; "
        f"{size(base)} params, {total} in kernels  ({time.perf_counter() - start:.1f}s)",
        flush=True)

  runs = {}
  for name in _METHODS.value:
    begin = time.perf_counter()
    params, trainable, state = finetune(name, task, task.batches, jax.random.fold_in(key, 1))
    runs[name] = (params, trainable, state, time.perf_counter() - begin, task.evaluate(params))
    print(f"{name}: {new_name} {runs[name][-1][0]:.4f}, {old_name} {runs[name][-1][1]:.4f}  "
          f"({runs[name][3]:.1f}s)", flush=True)

  state_bytes = {name: sj.finetune.state_bytes(run[2]) for name, run in runs.items()}
  full_bytes = state_bytes.get("full")
  rows = [f"| method | trainable | % of kernels | {new_name} (new) | {old_name} (old) | optimizer "
          "state bytes | x full | time (s) |", "| --- " + "| ---: " * 7 + "|"]
  for name, (_, trainable, _, seconds, (new, old)) in runs.items():
    share = "all" if name == "full" else f"{100 * trainable / total:.2f}"
    ratio = f"{state_bytes[name] / full_bytes:.3f}" if full_bytes else "-"
    rows.append(f"| {name} | {trainable} | {share} | {new:.4f} | {old:.4f} | "
                f"{state_bytes[name]} | {ratio} | {seconds:.1f} |")
  print("\n" + "\n".join(rows))
  print("(a sparse delta's state holds its values and indices; LoRA's A and B are params, "
        "outside its state; times include compiling)")
  merged = merging(task, runs, old_batches, key) if old_batches is not None else None
  print(f"\ntotal {time.perf_counter() - start:.1f}s")

  if _PLOT_PATH.value:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2 if merged else 1, figsize=(12 if merged else 7, 4.5),
                             squeeze=False)
    left, ylabel = axes[0, 0], _YLABEL[task.metric]
    bars(left, list(runs), [r[-1] for r in runs.values()], task.names, ylabel)
    if full_bytes:
      left.set_xticks(np.arange(len(runs)), [f"{n}\nstate {b / full_bytes:.3f}x"
                                             for n, b in state_bytes.items()], fontsize=8)
    left.set_title(f"fine-tuning on {new_task} at {_DENSITY.value:.0%} of the kernels")
    if merged:
      bars(axes[0, 1], list(merged), list(merged.values()), task.names, ylabel)
      axes[0, 1].set_title("merging deltas of 0-4 and 5-9 from one base")
    fig.tight_layout()
    fig.savefig(_PLOT_PATH.value, dpi=120)
    print(f"wrote {_PLOT_PATH.value}")


if __name__ == "__main__":
  app.run(main)
