r"""Prunes a trained byte-level LM without retraining, then recovers it briefly.

Trains the dense transformer of `train_lm.py` (or restores it from an orbax
checkpoint, written on the first run so reruns skip training), calibrates
it on a few training sequences with `sj.calibrate`, and prunes every linear
layer (attention projections and FFN; not the embedding) at 50%, 2:4 and 70%
with magnitude, Wanda, SparseGPT and Wanda followed by DSnoT, and at 70% also
with OWL's layerwise sparsities under Wanda. It prints validation loss
(nats/byte) and perplexity beside dense, then fine-tunes the best and the
worst 70% model for a few steps with `sj.fixed` (the mask is kept exactly)
and prints the recovered loss. Writes the table as markdown and a PNG.

  python examples/prune_lm.py                                 # ~4 min on 2 CPU cores
  python examples/prune_lm.py --steps=3000 --dim=256 --checkpoint=/tmp/lm_ckpt
  python examples/prune_lm.py --text_file=my_corpus.txt
"""

import hashlib
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import numpy as np
import optax

import sparsejax as sj
import train_lm  # the model, corpus and flags of the training example
from _common import train_step

flags.FLAGS.set_default("steps", 600)
flags.FLAGS.set_default("plot_path", "prune_lm.png")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Orbax checkpoint of the dense model: restored if it exists, written "
    "after training otherwise (default: a cache directory keyed by the model flags).")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 4,
                                    "Training batches used for calibration.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 60, "Recovery steps with sj.fixed.")
_FINETUNE_LR = flags.DEFINE_float("finetune_learning_rate", 1e-3, "Recovery learning rate.")
_TABLE_PATH = flags.DEFINE_string("table_path", "prune_lm.md", "Markdown table ('' for none).")

SETTINGS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern=(2, 4)), "70%": dict(sparsity=0.7)}
RULES = ("magnitude", "wanda", "sparsegpt", "wanda+dsnot", "owl+wanda")  # owl+wanda: at 70% only
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), f"Settings of {tuple(SETTINGS)}.")
_RULES = flags.DEFINE_list("rules", list(RULES), f"Rules of {RULES}.")


def checkpoint_path():
  if _CHECKPOINT.value:
    return os.path.abspath(_CHECKPOINT.value)
  names = ("steps", "seq", "batch", "dim", "heads", "layers", "learning_rate", "seed", "text_file")
  key = repr([flags.FLAGS[n].value for n in names]).encode()
  return os.path.join(tempfile.gettempdir(), "sparsejax_prune_lm",
                      hashlib.sha1(key).hexdigest()[:12])


def trained_model(train_data):
  """The dense LM, restored from the checkpoint or trained (and saved)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = checkpoint_path()
  model = train_lm.LM("dense", "dense", nnx.Rngs(train_lm._SEED.value))  # pylint: disable=protected-access
  checkpointer = ocp.StandardCheckpointer()
  if os.path.exists(path):
    graphdef, state = nnx.split(model)
    nnx.update(model, checkpointer.restore(path, state))
    print(f"restored the dense model from {path}")
    return model
  optimizer = train_lm.make_optimizer(model, "dense")
  rng = np.random.default_rng(train_lm._SEED.value)  # pylint: disable=protected-access
  start, steps = time.perf_counter(), train_lm._STEPS.value  # pylint: disable=protected-access
  for i, (x, y) in enumerate(train_lm.batches(train_data, rng, steps), 1):
    loss = train_step(model, optimizer, x, y)
    if i % 100 == 0 or i == steps:
      print(f"  train step {i}/{steps} loss {float(loss):.3f} ({time.perf_counter() - start:.0f}s)")
  checkpointer.save(path, nnx.split(model)[1])
  checkpointer.wait_until_finished()
  print(f"saved the dense model to {path}")
  return model


def val_loss(model, val_batches):
  return float(np.mean([train_lm.eval_loss(model, x, y) for x, y in val_batches]))


def prune(model, calibration, rule, setting):
  """(masks, params) of one rule at one setting."""
  params = nnx.state(model, nnx.Param)
  kwargs = dict(SETTINGS[setting]) if setting in SETTINGS else {}
  if rule == "owl+wanda":
    kwargs = dict(sparsity=sj.prune.owl(model, calibration, sparsity=0.7))
  if rule == "sparsegpt":
    return sj.prune.sparsegpt(model, calibration, **kwargs)
  if rule == "magnitude":
    masks = sj.prune.magnitude(model, calibration, **kwargs)
  else:
    masks = sj.prune.wanda(model, calibration, **kwargs)
  if rule == "wanda+dsnot":
    masks = sj.prune.dsnot(model, calibration, masks, pattern=kwargs.get("pattern"))
  return masks, sj.apply_masks(params, masks)


def with_params(model, params):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, rest)


def recover(model, masks, params, train_data):
  """A short fine-tune that keeps `masks` exactly; returns the model."""
  model = with_params(model, params)
  tx = sj.sparsify(optax.adamw(_FINETUNE_LR.value, weight_decay=0.01), sj.fixed(masks))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(train_lm._SEED.value + 1)  # pylint: disable=protected-access
  for x, y in train_lm.batches(train_data, rng, _FINETUNE_STEPS.value):
    train_step(model, optimizer, x, y)
  return model


def kept_fraction(model, masks):
  """Nonzero share of the pruned kernels (checks that recovery kept the mask)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  nonzero = total = 0
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    w = np.asarray(flat[key].get_value())
    assert np.all(w[~np.asarray(m)] == 0), key
    nonzero, total = nonzero + np.count_nonzero(w), total + w.size
  return nonzero / total


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  for name, values, allowed in (("settings", _SETTINGS.value, SETTINGS),
                                ("rules", _RULES.value, RULES)):
    if not values or any(v not in allowed for v in values):
      raise app.UsageError(f"--{name} takes a list of {tuple(allowed)}, got {values}")
  data = train_lm.load_corpus(train_lm._TEXT_FILE.value)  # pylint: disable=protected-access
  train_data, _, val_batches = train_lm.split_corpus(data)
  model = trained_model(train_data)
  dense = val_loss(model, val_batches)
  print(f"dense: val loss {dense:.4f} nats/byte, perplexity {np.exp(dense):.3f}")

  start = time.perf_counter()
  calib = [x for x, _ in train_lm.batches(train_data, np.random.default_rng(7),
                                          _CALIBRATION.value)]
  calibration = sj.calibrate(model, calib)
  print(f"calibrated {len(calibration.layers)} layers on {sum(x.size for x in calib)} tokens "
        f"({time.perf_counter() - start:.1f}s)")

  runs = [(s, r) for s in _SETTINGS.value for r in _RULES.value
          if r != "owl+wanda" or s == "70%"]
  results, pruned = {}, {}
  print("\n| setting | rule | val loss (nats/byte) | perplexity | vs dense | time |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  table = []
  for setting, rule in runs:
    start = time.perf_counter()
    masks, params = prune(model, calibration, rule, setting)
    loss = val_loss(with_params(model, params), val_batches)
    results[setting, rule], pruned[setting, rule] = loss, (masks, params)
    line = (f"| {setting} | {rule} | {loss:.4f} | {np.exp(loss):.3f} | {loss - dense:+.4f} | "
            f"{time.perf_counter() - start:.1f}s |")
    print(line)
    table.append(line)

  at_70 = {r: l for (s, r), l in results.items() if s == "70%"}
  recovered = {}
  if at_70:
    best, worst = min(at_70, key=at_70.get), max(at_70, key=at_70.get)
    print(f"\nrecovery at 70%, {_FINETUNE_STEPS.value} steps with sj.fixed (the mask is kept):")
  for rule in dict.fromkeys((best, worst)) if at_70 else ():
    masks, params = pruned["70%", rule]
    tuned = recover(model, masks, params, train_data)
    recovered[rule] = val_loss(tuned, val_batches)
    print(f"  {rule}: {at_70[rule]:.4f} -> {recovered[rule]:.4f} nats/byte "
          f"(perplexity {np.exp(recovered[rule]):.3f}); pruned kernels keep "
          f"{kept_fraction(tuned, masks):.3f} of their weights")

  if _TABLE_PATH.value:
    with open(_TABLE_PATH.value, "w") as f:
      f.write(f"dense: val loss {dense:.4f} nats/byte, perplexity {np.exp(dense):.3f}\n\n")
      f.write("| setting | rule | val loss (nats/byte) | perplexity | vs dense | time |\n")
      f.write("| --- | --- | ---: | ---: | ---: | ---: |\n" + "\n".join(table) + "\n\n")
      for rule, loss in recovered.items():
        f.write(f"recovered at 70%, {rule}: {at_70[rule]:.4f} -> {loss:.4f} nats/byte\n")
    print(f"wrote {_TABLE_PATH.value}")
  if train_lm._PLOT_PATH.value:  # pylint: disable=protected-access
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(8, 4))
    names = _RULES.value
    width = 0.8 / len(names)
    for i, rule in enumerate(names):
      shown = [(j, s) for j, s in enumerate(_SETTINGS.value) if (s, rule) in results]
      ax.bar([j + i * width for j, _ in shown], [results[s, rule] for _, s in shown], width,
             label=rule)
    ax.axhline(dense, color="black", linestyle="--", label="dense")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(_SETTINGS.value))], _SETTINGS.value)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(bottom=0.9 * dense)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(train_lm._PLOT_PATH.value, dpi=120)  # pylint: disable=protected-access
    print(f"wrote {train_lm._PLOT_PATH.value}")  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
