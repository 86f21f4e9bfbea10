r"""Post-training pruning cost against the dense forward pass, in one process.

1. SparseGPT on one layer of d_in = d_out = d (unstructured 50% and 2:4):
   its time divided by the time of one dense forward of the calibration set
   through that layer (``X @ W`` with X [tokens, d]), the paper's yardstick
   for "one-shot".
2. Calibration throughput: tokens/s of `sj.calibrate` on a stack of Linear
   layers with statistics on (with and without ``X^T X``), against the plain
   jitted forward pass over the same batches (statistics off). Calibration
   never computes the last layer's output, which it does not need.

  python benchmarks/prune.py                         # d = 1024, 2048, 4096
  python benchmarks/prune.py --sizes=1024 --tokens=8192
"""

import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from _common import timed
from sparsejax._src.prune import sparsegpt as sparsegpt_lib

_SIZES = flags.DEFINE_list("sizes", ["1024", "2048", "4096"], "Layer widths d_in = d_out.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Calibration tokens.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Linear layers in the calibration model.")
_WIDTH = flags.DEFINE_integer("width", 1024, "Width of the calibration model.")
_BATCH = flags.DEFINE_integer("batch", 2048, "Tokens per calibration batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")


class Stack(nnx.Module):

  def __init__(self, width, layers):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=nnx.Rngs(i)) for i in range(layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return x


def sparsegpt_table():
  print(f"SparseGPT on one layer, {_TOKENS.value} calibration tokens "
        f"({jax.devices()[0].platform})")
  print("| d | dense forward of the calibration set | SparseGPT 50% | ratio | "
        "SparseGPT 2:4 | ratio |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: |")
  rng = np.random.default_rng(0)
  for d in map(int, _SIZES.value):
    x = jnp.asarray(rng.normal(size=(_TOKENS.value, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
    gram = jnp.dot(x.T, x)
    dense = timed(jax.jit(jnp.dot), x, w, repeats=_REPEATS.value)
    row = f"| {d} | {dense * 1e3:.1f} ms"
    for kwargs in (dict(pattern=None, group="output"), dict(pattern=(2, 4), group="output")):
      def run(w, gram, kwargs=kwargs):
        return sparsegpt_lib.sparsegpt_matrix(w, gram, jnp.float32(0.5), jnp.float32(0.01),
                                              block_size=128, **kwargs)
      t = timed(run, w, gram, repeats=_REPEATS.value)
      row += f" | {t * 1e3:.0f} ms | {t / dense:.1f}x"
    print(row + " |")


def calibration_table():
  model = Stack(_WIDTH.value, _LAYERS.value)
  rng = np.random.default_rng(1)
  batches = [rng.normal(size=(_BATCH.value, _WIDTH.value)).astype(np.float32)
             for _ in range(max(_TOKENS.value // _BATCH.value, 1))]
  tokens = sum(len(b) for b in batches)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

  def plain():
    jax.block_until_ready([forward(state, b) for b in batches])

  def stats(gram):
    calibration = sj.calibrate(model, batches, gram=gram)  # compiles the statistics step
    params, paths = nnx.state(model, nnx.Param), [l.path for l in calibration.layers]

    def run():
      jax.block_until_ready(calibration.collect(params, paths))
    return run

  print(f"\nCalibration: {_LAYERS.value} Linear layers of width {_WIDTH.value}, {tokens} tokens "
        f"in batches of {_BATCH.value} (compilation excluded: each is run once first)")
  print("| statistics | tokens/s | time vs off |")
  print("| --- | ---: | ---: |")
  base = None
  for name, fn in (("off (plain forward)", plain), ("norms only (gram=False)", stats(False)),
                   ("norms and X^T X", stats(True))):
    fn()
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    t = float(np.median(times))
    base = base or t
    print(f"| {name} | {tokens / t:,.0f} | {t / base:.2f}x |")


def main(argv):
  del argv
  sparsegpt_table()
  calibration_table()


if __name__ == "__main__":
  app.run(main)
