r"""Sparse fine-tuning on scikit-learn's bundled digits: learn 5-9 over a model of 0-4.

An MLP (64-256-256-10, one 10-way head) is pretrained on the digits 0-4 only,
then fine-tuned on 5-9 from that same base, with the same Adam, steps and
batches, by:

* full: every parameter (the dense reference);
* lora: a minimal params-level LoRA written here, each kernel W [m, n] read as
  W + A @ B with only A [m, r] and B [r, n] trained;
* spiel, lt_sft, s2ft: `sj.finetune.sparse_delta` with those selectors (LT-SFT
  first runs a full fine-tune of a fifth of the steps, counted in its time;
  S2FT takes whole rows, the inputs of each kernel);
* sparse_lowrank: a sparse delta plus a low-rank term per kernel (DSEE,
  SLTrain), the budget split in half between the two.

Every method but full trains about `--density` of the kernels' entries (LoRA
and the low-rank term at the rank closest to that budget). The table gives
the accuracy on the new task (5-9), on the old one (0-4: forgetting) and the
optimizer state's bytes. Then two SpIEL deltas from the base, one that goes
on training on 0-4 and one on 5-9, are merged with `sj.finetune.merge` (sum
and average), and so are two full fine-tunes as task vectors, to measure the
interference.

References: Scaling Sparse Fine-Tuning to Large Language Models (SpIEL).
Ansell et al., 2024. arXiv:2401.16405. LoRA: Low-Rank Adaptation of Large
Language Models. Hu et al., 2021. arXiv:2106.09685. Editing Models with Task
Arithmetic. Ilharco et al., 2023. arXiv:2212.04089.

  python examples/finetune.py                    # ~25 s on 2 CPU cores
  python examples/finetune.py --density=0.01 --methods=full,lora,spiel --plot_path=''
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from _common import init_mlp, load_data, mlp_logits  # pylint: disable=g-multiple-import

METHODS = ("full", "lora", "spiel", "lt_sft", "s2ft", "sparse_lowrank")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Fine-tuning methods, of {METHODS}.")
_DENSITY = flags.DEFINE_float("density", 0.03, "Trainable share of the kernels' entries.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 600, "Pretraining steps on 0-4.")
_STEPS = flags.DEFINE_integer("steps", 400, "Fine-tuning steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_PLOT_PATH = flags.DEFINE_string("plot_path", "finetune.png", "PNG to write ('' for none).")

_SIZES = (64, 256, 256, 10)


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(mlp_logits(params, x), -1) == y)


def train(tx, trainable, batches, to_params=lambda t: t):
  """Steps of `tx` over `batches` ([steps, batch, ...] x and y) in one jitted scan.

  `to_params` maps what is trained to the model's params (LoRA's factors to
  W + A @ B); returns the trained pytree and the optimizer state.
  """
  def step(carry, batch):
    trainable, state = carry
    loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        mlp_logits(to_params(t), batch[0]), batch[1]).mean()
    updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
    return (optax.apply_updates(trainable, updates), state), None

  run = jax.jit(lambda t, b: jax.lax.scan(step, (t, tx.init(t)), b)[0])
  return jax.block_until_ready(run(trainable, batches))


def lora(base, rank, key):
  """A params-level LoRA on every kernel: (factors, to_params).

  A starts random (scaled 1/sqrt(m), as `sparse_delta`'s low-rank term) and B
  at zero, so training starts at the base.
  """
  factors = {}
  for k, (name, layer) in zip(jax.random.split(key, len(base)), base.items()):
    m, n = layer["kernel"].shape
    factors[name] = {"a": jax.random.normal(k, (m, rank)) / np.sqrt(m), "b": jnp.zeros((rank, n))}

  def to_params(factors):
    return {name: {**layer, "kernel": layer["kernel"] + factors[name]["a"] @ factors[name]["b"]}
            for name, layer in base.items()}

  return factors, to_params


def budget_rank(base, entries):
  """The rank r whose factors over every kernel, r * (m + n) each, come closest to `entries`."""
  return max(1, round(entries / sum(sum(layer["kernel"].shape) for layer in base.values())))


def size(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def deltas(delta):
  return jax.tree.leaves(delta, is_leaf=lambda x: isinstance(x, sj.finetune.SparseDelta))


def entries(delta):
  """Trainable entries of a delta: its values and low-rank factors, not its indices."""
  return sum(size([d.values, d.a, d.b]) for d in deltas(delta))


def finetune(name, base, batches, key):
  """Fine-tunes `base` by method `name`: (params, trainable entries, optimizer state)."""
  adam = optax.adam(_LEARNING_RATE.value)
  density, steps = _DENSITY.value, len(batches[0])
  kernels = sum(layer["kernel"].size for layer in base.values())
  if name == "full":
    params, state = train(adam, base, batches)
    return params, size(base), state
  if name == "lora":
    factors, to_params = lora(base, budget_rank(base, density * kernels), key)
    factors, state = train(adam, factors, batches, to_params)
    return to_params(factors), size(factors), state
  spiel = lambda d: sj.finetune.spiel(d, update_every=max(steps // 10, 1), key=key,  # noqa: E731
                                      end_step=3 * steps // 4)
  extra = {}
  if name == "spiel":
    selector = spiel(density)
  elif name == "lt_sft":
    short, _ = train(adam, base, jax.tree.map(lambda b: b[:max(steps // 5, 1)], batches))
    selector = sj.finetune.lt_sft(density, finetuned=short)
  elif name == "s2ft":
    # Rows (a kernel's inputs): with the default axis=-1 the 10-way head would
    # get the column of one class only, and 5-9 accuracy stays 0.
    selector = sj.finetune.s2ft(density, key=key, axis=0)
  elif name == "sparse_lowrank":  # half the budget sparse, half in rank-r factors
    selector = spiel(density / 2)
    extra = {"rank": budget_rank(base, density * kernels / 2), "key": jax.random.fold_in(key, 1)}
  else:
    raise app.UsageError(f"unknown method {name!r}; expected one of {METHODS}")
  params, state = train(sj.finetune.sparse_delta(adam, selector, **extra), base, batches)
  return params, entries(sj.finetune.get_delta(state)), state


def task_batches(x, y, steps, seed):
  """The same `steps` batches of (x, y) for every method."""
  idx = np.random.default_rng(seed).integers(0, len(x), (steps, _BATCH_SIZE.value))
  return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def main(argv):
  del argv
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
  x_train, y_train, x_test, y_test = load_data("digits", seed=_SEED.value)
  old, new = y_train < 5, y_train >= 5
  old_batches = task_batches(x_train[old], y_train[old], _STEPS.value, _SEED.value + 1)
  new_batches = task_batches(x_train[new], y_train[new], _STEPS.value, _SEED.value + 2)
  new_test, old_test = [(x_test[t], y_test[t]) for t in (y_test >= 5, y_test < 5)]
  both = lambda p: (float(accuracy(p, *new_test)), float(accuracy(p, *old_test)))  # noqa: E731
  key = jax.random.key(_SEED.value)
  tune_key = jax.random.fold_in(key, 1)
  start = time.perf_counter()

  base, _ = train(optax.adam(_LEARNING_RATE.value), init_mlp(key, _SIZES),
                  task_batches(x_train[old], y_train[old], _PRETRAIN_STEPS.value, _SEED.value))
  kernels = sum(layer["kernel"].size for layer in base.values())
  print(f"base (pretrained on 0-4 for {_PRETRAIN_STEPS.value} steps): 5-9 acc "
        f"{both(base)[0]:.4f}, 0-4 acc {both(base)[1]:.4f}; {size(base)} params, {kernels} in "
        f"kernels  ({time.perf_counter() - start:.1f}s)", flush=True)

  runs = {}
  for name in _METHODS.value:
    begin = time.perf_counter()
    params, trainable, state = finetune(name, base, new_batches, tune_key)
    runs[name] = (params, trainable, state, time.perf_counter() - begin)
    print(f"{name}: 5-9 acc {both(params)[0]:.4f}, 0-4 acc {both(params)[1]:.4f}  "
          f"({runs[name][-1]:.1f}s)", flush=True)

  state_bytes = {name: sj.finetune.state_bytes(run[2]) for name, run in runs.items()}
  full_bytes = state_bytes.get("full")
  rows = ["| method | trainable | % of kernels | 5-9 acc (new) | 0-4 acc (old) | optimizer "
          "state bytes | x full | time (s) |", "| --- " + "| ---: " * 7 + "|"]
  for name, (params, trainable, _, seconds) in runs.items():
    share = "all" if name == "full" else f"{100 * trainable / kernels:.2f}"
    ratio = f"{state_bytes[name] / full_bytes:.3f}" if full_bytes else "-"
    new_acc, old_acc = both(params)
    rows.append(f"| {name} | {trainable} | {share} | {new_acc:.4f} | {old_acc:.4f} | "
                f"{state_bytes[name]} | {ratio} | {seconds:.1f} |")
  print("\n" + "\n".join(rows))
  print("(a sparse delta's state holds its values and indices; LoRA's A and B are params, "
        "outside its state; times include compiling)")

  # Merging: deltas of 0-4 and 5-9 from one base, sparse (SpIEL) and dense (task vectors).
  def tuned(name, task):  # each task from its own random SpIEL support
    if task == "5-9":
      return runs[name] if name in runs else finetune(name, base, new_batches, tune_key)
    return finetune(name, base, old_batches, jax.random.fold_in(key, 2))

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
  print(f"\ntotal {time.perf_counter() - start:.1f}s")

  if _PLOT_PATH.value:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, labels, accs in [(left, list(runs), [both(r[0]) for r in runs.values()]),
                             (right, list(merged), list(merged.values()))]:
      at = np.arange(len(labels))
      ax.bar(at - 0.2, [a[0] for a in accs], 0.4, label="5-9 (new)")
      ax.bar(at + 0.2, [a[1] for a in accs], 0.4, label="0-4 (old)")
      ax.set_xticks(at, labels, rotation=30, ha="right")
      ax.set_ylim(0, 1.15)
      ax.set_ylabel("test accuracy")
      ax.legend(loc="upper center", ncol=2)
    if full_bytes:
      left.set_xticks(np.arange(len(runs)), [f"{n}\nstate {b / full_bytes:.3f}x"
                                             for n, b in state_bytes.items()], fontsize=8)
    left.set_title(f"fine-tuning on 5-9 at {_DENSITY.value:.0%} of the kernels")
    right.set_title("merging deltas of 0-4 and 5-9 from one base")
    fig.tight_layout()
    fig.savefig(_PLOT_PATH.value, dpi=120)
    print(f"wrote {_PLOT_PATH.value}")


if __name__ == "__main__":
  app.run(main)
