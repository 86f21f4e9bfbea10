r"""Activation sparsity on the byte-level LM: trained sparse FFNs, then thresholds after training.

1. Trains the transformer of `train_lm.py` three times, same steps, batches
   and initialization, with FFN activations GELU, ReLU² (`relu2`) and
   Q-Sparse's top-k (`topk`: GELU, then a quarter of the units kept, with a
   straight-through gradient), and reports each one's validation loss and
   the share of exact zeros its FFN hidden units reach on validation data.
2. Calibrates the GELU model once (`sj.calibrate(..., histogram=True)`) and
   thresholds the inputs of every Linear layer (attention projections and
   FFN) after training with TEAL (one sparsity for every layer, or spread
   by its greedy allocation, `sj.activations.allocate`), CHESS and WINA at
   each `--sparsities` (`sj.nn.sparsify_inputs`), reporting validation loss
   against the input sparsity reached on validation data (weighted by
   kernel size: the share of weight reads skipped).
3. Generates bytes one token at a time with the dense GELU model and with
   its `--decode_rule` version at `--decode_sparsity`, whose Linear layers
   multiply with `sparse_input_matmul`, and reports tokens per second.

The default corpus is Python's standard-library source (nothing is downloaded).
Writes a PNG of validation loss against input sparsity.

  python examples/activation_sparsity.py                      # ~4 min on 2 CPU cores
  python examples/activation_sparsity.py --free_rules=teal --sparsities=0.5 --activations=gelu
"""

import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
import generate_lm  # decoding with a KV cache, one token a step
import prune_lm  # the calibration flags
import train_lm  # the model, corpus and flags of the training example

# generate_lm sets its own defaults on import; these are this example's.
for _name, _value in [("steps", 300), ("seq", 128), ("batch", 16), ("eval_batches", 4),
                      ("gen_batch", 1), ("prompt", 32), ("timed_runs", 3),
                      ("plot_path", "activation_sparsity.png")]:
  flags.FLAGS.set_default(_name, _value)

RULES = ("teal", "teal_greedy", "chess", "wina")
_ACTIVATIONS = flags.DEFINE_list("activations", list(train_lm.ACTIVATIONS),
                                 f"FFN activations to train, of {tuple(train_lm.ACTIVATIONS)}.")
_RULES = flags.DEFINE_list("free_rules", list(RULES), f"Training-free rules, of {RULES}.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.25", "0.4", "0.5"],
                                "Input sparsities for the training-free rules.")
_DECODE_RULE = flags.DEFINE_enum("decode_rule", "teal", RULES, "Rule of the timed sparse decode.")
_DECODE_SPARSITY = flags.DEFINE_float("decode_sparsity", 0.5, "Sparsity of the timed decode.")
_DECODE_IMPL = flags.DEFINE_enum(
    "decode_implementation", "xla", ["xla", "pallas", "default"],
    "sparse_input_matmul implementation of the timed sparse decode; 'default' lets it choose "
    "(the dense product for layers under 512 KiB, as at the default width).")


def ffn_hidden(model, tokens):
  """The FFN hidden units (the down projections' inputs) of every block, [blocks, ...]."""
  x = model.embed(tokens) + model.position[...][None]
  hidden = []
  for block in model.blocks:
    x = x + block.attention(block.norm1(x))
    h = block.activation(block.up(block.norm2(x)))
    hidden.append(h)
    x = x + block.down(h)
  return jnp.stack(hidden)


def val_loss(model, val_batches):
  return float(np.mean([train_lm.eval_loss(model, x, y) for x, y in val_batches]))


def reached(calibration, thresholds):
  """Input sparsity averaged over the layers, weighted by kernel size: the share of weight reads skipped."""
  shares = sj.activations.input_sparsity(calibration, thresholds)
  sizes = {l.path: l.d_in * l.d_out for l in calibration.layers}
  return sum(float(s) * sizes[p] for p, s in shares.items()) / sum(sizes[p] for p in shares)


def thresholds_of(rule, model, calibration, sparsity):
  if rule == "wina":
    return sj.activations.wina(model, calibration, sparsity=sparsity)
  if rule == "teal_greedy":  # per-layer sparsities by TEAL's greedy allocation
    sparsities = sj.activations.allocate(model, calibration, sparsity=sparsity)
    return sj.activations.teal(calibration, sparsity=sparsities)
  return getattr(sj.activations, rule)(calibration, sparsity=sparsity)


def main(argv):
  del argv
  for name, values, allowed in [("activations", _ACTIVATIONS.value, train_lm.ACTIVATIONS),
                                ("free_rules", _RULES.value, RULES)]:
    if not values or any(v not in allowed for v in values):
      raise app.UsageError(f"--{name} takes a list of {tuple(allowed)}, got {values}")
  sparsities = [float(s) for s in _SPARSITIES.value]
  if any(not 0 <= s < 1 for s in sparsities + [_DECODE_SPARSITY.value]):
    raise app.UsageError("sparsities must lie in [0, 1)")
  data = train_lm.load_corpus(train_lm._TEXT_FILE.value)  # pylint: disable=protected-access
  train_data, val_data, val_batches = train_lm.split_corpus(data)
  steps = train_lm._STEPS.value  # pylint: disable=protected-access
  print(f"byte-level LM, {steps} steps per activation; validation: {len(val_batches)} batches")

  # 1. Trained activation sparsity.
  trained = {}
  for activation in dict.fromkeys(["gelu", *_ACTIVATIONS.value]):  # gelu: the baseline
    loss, _, _, model = train_lm.run("dense", "dense", train_data, val_batches, activation)
    hidden = jnp.concatenate([ffn_hidden(model, x) for x, _ in val_batches], axis=1)
    trained[activation] = (model, loss, float(sj.activations.sparsity(hidden)))
  gelu_model, gelu_loss, _ = trained["gelu"]
  print("\n| FFN activation | val loss | vs GELU | FFN activation sparsity (exact zeros) |")
  print("| --- | ---: | ---: | ---: |")
  for activation, (_, loss, sparsity) in trained.items():
    print(f"| {activation} | {loss:.4f} | {loss - gelu_loss:+.4f} | {sparsity:.3f} |")

  # 2. Training-free: thresholds on the GELU model's Linear inputs.
  rng = np.random.default_rng(1)
  count = prune_lm._CALIBRATION.value  # pylint: disable=protected-access
  batches = [x for x, _ in train_lm.batches(train_data, rng, count)]
  start = time.perf_counter()
  calibration = sj.calibrate(gelu_model, batches, histogram=True, gram=False)
  held_out = sj.calibrate(gelu_model, [x for x, _ in val_batches], histogram=True, gram=False)
  print(f"\ncalibrated {len(calibration.layers)} Linear layers on {len(batches)} training "
        f"batches ({time.perf_counter() - start:.1f}s); sparsity reached on validation data")
  free = {}
  for rule in _RULES.value:
    for s in sparsities:
      thresholds = thresholds_of(rule, gelu_model, calibration, s)
      sparse = sj.nn.sparsify_inputs(nnx.clone(gelu_model), thresholds)
      free[rule, s] = (reached(held_out, thresholds), val_loss(sparse, val_batches))
  print("| rule | target | reached | val loss | vs dense GELU |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for (rule, s), (got, loss) in free.items():
    print(f"| {rule} | {s:.2f} | {got:.3f} | {loss:.4f} | {loss - gelu_loss:+.4f} |")

  # 3. Decoding: dense vs sparse-input matmuls.
  starts = rng.integers(0, len(val_data) - generate_lm._PROMPT.value,  # pylint: disable=protected-access
                        generate_lm._GEN_BATCH.value)  # pylint: disable=protected-access
  prompts = jnp.asarray(np.stack([val_data[i:i + generate_lm._PROMPT.value]  # pylint: disable=protected-access
                                  for i in starts]), jnp.int32)
  key, pattern = jax.random.key(0), generate_lm.make_pattern("dense")
  thresholds = thresholds_of(_DECODE_RULE.value, gelu_model, calibration, _DECODE_SPARSITY.value)
  implementation = None if _DECODE_IMPL.value == "default" else _DECODE_IMPL.value
  sparse = sj.nn.sparsify_inputs(nnx.clone(gelu_model), thresholds, implementation=implementation)
  _, dense_speed = generate_lm.tokens_per_second(gelu_model, pattern, prompts, key)
  _, sparse_speed = generate_lm.tokens_per_second(sparse, pattern, prompts, key)
  print(f"\ndecode, batch {prompts.shape[0]}, width {train_lm._DIM.value}: dense "  # pylint: disable=protected-access
        f"{dense_speed:.0f} tokens/s, {_DECODE_RULE.value} at {_DECODE_SPARSITY.value:.0%} "
        f"(sparse_input_matmul, {_DECODE_IMPL.value}) {sparse_speed:.0f} tokens/s: "
        f"{sparse_speed / dense_speed:.2f}x. At this width every weight is under 512 KiB and "
        "listing its nonzero inputs costs more than reading it (the default implementation "
        "then takes the dense product); benchmarks/activation_sparsity.py measures the matmul "
        "at decode widths.")

  plot_path = train_lm._PLOT_PATH.value  # pylint: disable=protected-access
  if plot_path:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule in _RULES.value:
      points = [free[rule, s] for s in sparsities]
      ax.plot([0] + [p[0] for p in points], [gelu_loss] + [p[1] for p in points], "o-",
              label=f"{rule} (GELU model, after training)")
    for activation, (_, loss, sparsity) in trained.items():
      if activation != "gelu":
        ax.scatter(sparsity, loss, marker="*", s=80, label=f"{activation} (trained)")
    ax.set_xlabel("activation sparsity")
    ax.set_ylabel("val loss (nats/byte)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    print(f"wrote {plot_path}")


if __name__ == "__main__":
  app.run(main)
