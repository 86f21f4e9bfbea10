r"""`sj.matmul.sparse_input_matmul` on sparse decode activations against dense `jnp.dot`.

One decode-shaped product ``x @ w``, x [batch, d] with some input channels
zero and w [d, d_out], for each `implementation` beside the jitted dense
``jnp.dot(x, w)`` on the same arrays, in one process. Input patterns:

* `random` (batch 1): a random set of channels is zero;
* `shared` (batch > 1): every row is zero on the same channels, as a
  channel-wise threshold on correlated activations tends to give;
* `independent` (batch > 1): each row its own random set. The kernel reads
  the rows of ``w`` at channels nonzero in *any* row, so the union density
  (printed) is what it reads: at 90% sparsity per row and batch 8, 57%.

Each sparsity has exactly its share of zeros per row. Results are checked
against the float32 product before they are timed. Dense and sparse calls
interleave over rounds (each round times `--calls` calls of each row, after
one warm-up); the median round is reported. Successive calls cycle through
copies of w that together fill `--working_set_mb`, as a decode step goes
through its layers: each call reads its w from memory, not from a cache
that one hot matrix would fit (a 2048^2 float32 w is 16 MB, half of the
L3 of the CPU machine this was tuned on). The dense time of a group (one
d, batch and pattern) is the median of its dense rows, one per sparsity, all
timed in the same rounds: a dense product costs the same whatever the
zeros. At the end: issue 17's CPU targets at batch 1 (50% sparsity at most
0.65x dense, 90% at most 0.2x).

  python benchmarks/activation_sparsity.py                      # d 2048, 4096, 8192; float32
  python benchmarks/activation_sparsity.py --ds=4096 --d_out=11008 --dtype=bfloat16
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparsejax import matmul as sjm
from _common import implementations, timed_rounds  # pylint: disable=g-multiple-import

_DS = flags.DEFINE_list("ds", ["2048", "4096", "8192"], "Input widths d (w is [d, d_out]).")
_D_OUT = flags.DEFINE_integer("d_out", None, "Output width (default: d).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows of x.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0", "25", "40", "50", "70", "90"],
                                "Percent of each row's channels that are zero.")
_PATTERNS = flags.DEFINE_list("patterns", ["shared", "independent"],
                              "Patterns at batch > 1 (batch 1 has one: random).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "dtype of x and w.")
_IMPLS = flags.DEFINE_list("implementations", None, "sparse_input_matmul implementations "
                           "(default: 'xla' on CPU; 'pallas_triton' and 'xla' on GPU).")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed rounds (median).")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls of each row timed per round (at least one "
                              "per copy of w).")
_WORKING_SET = flags.DEFINE_integer("working_set_mb", 256, "Copies of w cycled through by "
                                    "successive calls fill this many MB (1 to 64 copies).")

TARGETS = {50.0: 0.65, 90.0: 0.2}  # issue 17, CPU, batch 1: sparsity (%) -> time ÷ dense


def activations(rng, batch, d, sparsity, pattern):
  """x [batch, d] (float32, numpy) with round(sparsity * d) zeros per row, laid out by `pattern`."""
  x = rng.standard_normal((batch, d)).astype(np.float32)
  zeros = int(round(sparsity * d))
  if pattern == "independent":
    for row in x:
      row[rng.permutation(d)[:zeros]] = 0
  else:  # random (one row) or shared: the same channels in every row
    x[:, rng.permutation(d)[:zeros]] = 0
  return x


def checked(fn, x, w, want, tol):
  """None if `fn(x, w)` runs and matches `want` within `tol` (relative to its largest entry)."""
  try:
    got = np.asarray(fn(x, w).astype(jnp.float32))
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]
  err = float(np.abs(got - want).max() / np.abs(want).max())
  return None if err <= tol else f"wrong result: relative error {err:.1e} > {tol:.0e}"


def repeated(fn, calls):
  """`fn(x, ws[i % len(ws)])` for i < `calls`, each to completion (one timed unit of a round)."""
  def run(x, ws):
    for i in range(calls):
      out = jax.block_until_ready(fn(x, ws[i % len(ws)]))
    return out
  return run


def main(argv):
  del argv
  backend = jax.default_backend()
  impls = _IMPLS.value or implementations(backend)
  if backend == "gpu":
    impls = sorted(impls, key=lambda name: name != "pallas_triton")  # the kernel first
  dtype = jnp.dtype(_DTYPE.value)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  print(f"{backend}, jax {jax.__version__}; {dtype.name}, d_out {_D_OUT.value or 'd'}, "
        f"median of {_REPEATS.value} interleaved rounds of {_CALLS.value}+ calls cycling "
        f"through {_WORKING_SET.value} MB of w copies; "
        f"implementations: {', '.join(impls)}"
        + (" (Pallas in interpret mode)" if backend == "cpu" and any("pallas" in i for i in impls)
           else "") + "\n")
  print(f"{'d':>6} {'batch':>5}  {'pattern':<11} {'sparsity':>8} {'union':>6}  {'impl':<13} "
        f"{'dense ms':>9} {'sparse ms':>9} {'ratio':>7}  note")
  dense = jax.jit(jnp.dot)
  sparse = {name: jax.jit(lambda x, w, name=name: sjm.sparse_input_matmul(
      x, w, implementation=name)) for name in impls}
  exact = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                                       precision=lax.Precision.HIGHEST))
  rng = np.random.default_rng(0)
  ratios = {}  # (d, impl, sparsity) -> ratio at batch 1
  for d in map(int, _DS.value):
    d_out = _D_OUT.value or d
    w = jnp.asarray(rng.standard_normal((d, d_out), np.float32) / np.sqrt(d), dtype)
    copies = min(64, max(1, -(-_WORKING_SET.value * 2**20 // w.nbytes)))
    ws = [w] + [w + 0 for _ in range(copies - 1)]  # distinct buffers, same values
    calls = max(_CALLS.value, copies)
    for batch in map(int, _BATCHES.value):
      for pattern in (["random"] if batch == 1 else _PATTERNS.value):
        rows = []  # (sparsity %, union density, impl or None for dense, x, error)
        for percent in map(float, _SPARSITIES.value):
          x_host = activations(rng, batch, d, percent / 100, pattern)
          x = jnp.asarray(x_host, dtype)
          union = float(np.any(x_host != 0, axis=0).mean())
          rows.append((percent, union, None, x, None))
          want = np.asarray(exact(x, w))
          rows += [(percent, union, name, x, checked(sparse[name], x, w, want, tol))
                   for name in impls]
        live = [r for r in rows if r[4] is None]
        results = timed_rounds([(repeated(sparse[r[2]] if r[2] else dense, calls), (r[3], ws))
                                for r in live], repeats=_REPEATS.value)
        seconds = {id(r): result for r, result in zip(live, results)}
        # The dense product costs the same whatever the zeros: one time for the group, the
        # median of its dense rows (each already a median over the same interleaved rounds).
        dense_times = [seconds[id(r)][0] for r in rows if r[2] is None and id(r) in seconds]
        dense_times = [t for t in dense_times if t is not None]
        base = float(np.median(dense_times)) / calls if dense_times else None
        for row in rows:
          percent, union, name, _, error = row
          if name is None:
            continue
          t, error = seconds.get(id(row), (None, error))
          head = f"{d:>6} {batch:>5}  {pattern:<11} {percent:>7g}% {union:6.3f}  {name:<13}"
          if t is None or base is None:
            print(f"{head} {'n/a':>9}  {error or 'dense failed'}")
            continue
          t /= calls
          print(f"{head} {1e3 * base:9.3f} {1e3 * t:9.3f} {t / base:6.3f}x", flush=True)
          if batch == 1:
            ratios[d, name, percent] = t / base
  print(f"\nIssue 17's CPU targets at batch 1 (time ÷ dense), this run on {backend}:")
  for name in impls:
    for d in map(int, _DS.value):
      parts = []
      for percent, goal in TARGETS.items():
        ratio = ratios.get((d, name, percent))
        if ratio is not None:
          parts.append(f"{percent:g}%: {ratio:.3f}x (<= {goal}: "
                       f"{'met' if ratio <= goal else 'NOT met'})")
      if parts:
        print(f"  d {d:>5}, {name:<13} " + "; ".join(parts))


if __name__ == "__main__":
  app.run(main)
