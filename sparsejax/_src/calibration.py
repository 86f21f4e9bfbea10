"""Calibration: per-layer input statistics of a trained model, streamed over batches.

`calibrate` runs a model on a few batches and keeps, for every linear layer
it calls, what the post-training rules need about that layer's inputs
``X`` [tokens, d_in] (d_in: the kernel's contracted features):

* ``count`` tokens, ``sum`` and ``sum_sq`` per input feature (Wanda's norms
  ``||X_j||``, DSnoT's means and variances, OWL's outlier scores),
* ``gram = X^T X`` [d_in, d_in] (SparseGPT's Hessian, DSnoT's error),
* ``abs_hist``, a histogram of ``|X_j|`` per input feature on a fixed
  logarithmic grid [d_in, `HIST_BINS`] (activation sparsity's thresholds:
  quantiles of ``|X|`` per tensor or per channel, `LayerStats.abs_quantile`).

Activations are never kept: each batch adds to the sums inside one jitted
step, so memory is O(d_in^2) per layer whatever the number of tokens.

Layers are found by type. For flax nnx: `nnx.Linear`, `nnx.LinearGeneral`
and `nnx.Einsum`; for linen: `nn.Dense`, `nn.DenseGeneral` and `nn.Einsum`
(embeddings are not linear layers, so they are left out). Any other module
type listed in ``types`` is read as a Dense: ``x[..., d_in] @ kernel[d_in, ...]``
with its weights in a param called ``kernel``; `where` (path patterns on the
kernel path, as in `sparsify`) narrows the choice.

Every kernel is seen by the pruning rules as a matrix [d_in, d_out]: the
contracted axes first, flattened, and the others after (`Layer.to_matrix`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sparsejax._src import _checks
from sparsejax._src import pytree
from sparsejax._src import sharding

PyTree = Any

# The |x| histogram: bin 0 holds |x| < 2**HIST_LOW (zeros included), bin b in
# [1, HIST_BINS - 2] holds [2**(HIST_LOW + (b - 1) / HIST_PER_OCTAVE),
# 2**(HIST_LOW + b / HIST_PER_OCTAVE)), the last bin everything above.
HIST_LOW = -24
HIST_HIGH = 16
HIST_PER_OCTAVE = 16  # bins 4.4% wide: thresholds interpolate inside a bin
HIST_BINS = (HIST_HIGH - HIST_LOW) * HIST_PER_OCTAVE + 2


def hist_bins(magnitudes: jax.Array) -> jax.Array:
  """The histogram bin of each ``|x|`` (int32, same shape)."""
  a = magnitudes.astype(jnp.float32)
  tiny = a < 2.0 ** HIST_LOW
  b = jnp.floor((jnp.log2(jnp.where(tiny, 1.0, a)) - HIST_LOW) * HIST_PER_OCTAVE) + 1
  return jnp.where(tiny, 0, jnp.clip(b, 1, HIST_BINS - 1)).astype(jnp.int32)


@jax.jit
def hist_quantile(counts: jax.Array, q: jax.Array) -> jax.Array:
  """The value below which a share `q` of a histogram's mass lies, per row of `counts`.

  Interpolates geometrically inside the bin where the cumulative mass crosses
  `q` (linearly in the first bin, which starts at 0). `counts`: [..., HIST_BINS].
  """
  counts = counts.astype(jnp.float32)
  cum = jnp.cumsum(counts, axis=-1)
  total = cum[..., -1:]
  target = jnp.asarray(q, jnp.float32)[..., None] * total if jnp.ndim(q) else q * total
  b = jnp.minimum(jnp.sum(cum < target, axis=-1, keepdims=True), HIST_BINS - 1)
  below = jnp.take_along_axis(cum, b, -1) - jnp.take_along_axis(counts, b, -1)
  inside = jnp.take_along_axis(counts, b, -1)
  f = jnp.clip((target - below) / jnp.maximum(inside, 1e-30), 0.0, 1.0)
  low = 2.0 ** (HIST_LOW + (b.astype(jnp.float32) - 1) / HIST_PER_OCTAVE)
  value = jnp.where(b == 0, f * 2.0 ** HIST_LOW,
                    jnp.where(b == HIST_BINS - 1, 2.0 ** HIST_HIGH,
                              low * 2.0 ** (f / HIST_PER_OCTAVE)))
  return jnp.where(total > 0, value, 0.0)[..., 0]


@jax.jit
def hist_cdf(counts: jax.Array, value: jax.Array) -> jax.Array:
  """The share of a histogram's mass at or below `value`, per row (inverse of `hist_quantile`).

  `counts`: [..., HIST_BINS]; `value`: broadcastable to ``counts.shape[:-1]``.
  """
  counts = counts.astype(jnp.float32)
  value = jnp.broadcast_to(jnp.asarray(value, jnp.float32), counts.shape[:-1])[..., None]
  b = hist_bins(value)
  cum = jnp.cumsum(counts, axis=-1)
  below = jnp.take_along_axis(cum, b, -1) - jnp.take_along_axis(counts, b, -1)
  low = 2.0 ** (HIST_LOW + (b.astype(jnp.float32) - 1) / HIST_PER_OCTAVE)
  f = jnp.where(b == 0, value / 2.0 ** HIST_LOW,
                jnp.where(b == HIST_BINS - 1, 1.0,
                          jnp.log2(jnp.maximum(value, 1e-38) / low) * HIST_PER_OCTAVE))
  mass = below + jnp.clip(f, 0.0, 1.0) * jnp.take_along_axis(counts, b, -1)
  return (mass / jnp.maximum(cum[..., -1:], 1.0))[..., 0]


class LayerStats(NamedTuple):
  """Statistics of one layer's inputs ``X`` [tokens, d_in], in float32.

  Attributes:
    count: int32 number of input rows (tokens) seen.
    sum: ``X.sum(0)``, [d_in].
    sum_sq: ``(X * X).sum(0)``, [d_in].
    gram: ``X.T @ X``, [d_in, d_in], or None if calibrated with ``gram=False``.
    abs_hist: counts of ``|X_j|`` per feature and bin [d_in, `HIST_BINS`], or
      None unless calibrated with ``histogram=True``.
  """

  count: jax.Array
  sum: jax.Array
  sum_sq: jax.Array
  gram: jax.Array | None
  abs_hist: jax.Array | None = None

  def norms(self) -> jax.Array:
    """``||X_j||_2`` per input feature (Wanda's activation norm)."""
    return jnp.sqrt(self.sum_sq)

  def mean(self) -> jax.Array:
    return self.sum / jnp.maximum(self.count, 1)

  def variance(self) -> jax.Array:
    return jnp.maximum(self.sum_sq / jnp.maximum(self.count, 1) - self.mean() ** 2, 0.0)

  def abs_quantile(self, q: Any, *, per_channel: bool = False) -> jax.Array:
    """The `q`-quantile of ``|X|``: a scalar over the layer, or [d_in] per channel.

    From the histogram (calibrate with ``histogram=True``), to within a bin
    (4.4%) in value; a share `q` of the entries have ``|x|`` at most the result.
    """
    if self.abs_hist is None:
      raise ValueError("these statistics have no |x| histogram: calibrate with histogram=True")
    return hist_quantile(self.abs_hist if per_channel else self.abs_hist.sum(0), q)


def _zero_stats(d_in: int, gram: bool, histogram: bool) -> LayerStats:
  return LayerStats(jnp.zeros([], jnp.int32), jnp.zeros([d_in], jnp.float32),
                    jnp.zeros([d_in], jnp.float32),
                    jnp.zeros([d_in, d_in], jnp.float32) if gram else None,
                    jnp.zeros([d_in, HIST_BINS], jnp.float32) if histogram else None)


def _add_hist(hist: jax.Array, rows: jax.Array) -> jax.Array:
  flat = jnp.arange(rows.shape[1], dtype=jnp.int32)[None] * HIST_BINS + hist_bins(jnp.abs(rows))
  return hist + jnp.zeros(hist.size, jnp.float32).at[flat.ravel()].add(1.0).reshape(hist.shape)


def _add_rows(stats: LayerStats, rows: jax.Array) -> LayerStats:
  rows = rows.astype(jnp.float32)
  gram = None
  if stats.gram is not None:
    # Tokens sharded over explicit mesh axes: the sum over them is replicated.
    out = {} if sharding.explicit_spec(rows) is None else {
        "out_sharding": NamedSharding(jax.typeof(rows).sharding.mesh, PartitionSpec())}
    gram = stats.gram + jnp.dot(rows.T, rows, precision=lax.Precision.HIGHEST, **out)
  hist = None if stats.abs_hist is None else _add_hist(stats.abs_hist, rows)
  return LayerStats(stats.count + rows.shape[0], stats.sum + rows.sum(0),
                    stats.sum_sq + (rows * rows).sum(0), gram, hist)


@dataclasses.dataclass(frozen=True)
class Layer:
  """A calibrated layer: its kernel and how its input contracts with it.

  Attributes:
    path: the kernel's path in the params, ``"blocks/0/up/kernel"``.
    kind: the module's class name.
    kernel_shape: the kernel's shape.
    kernel_axes: the kernel axes contracted with the input, in order.
    input_axes: the input axes they contract with (negative: from the end).
    group: layers called on the same input array share a group (the
      query, key and value projections of an attention block); sequential
      pruning recalibrates once per group.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[int, ...]
  input_axes: tuple[int, ...]
  group: int

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.kernel_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape) // max(self.d_in, 1)

  def to_matrix(self, kernel: jax.Array) -> jax.Array:
    """The kernel as a [d_in, d_out] matrix."""
    k = len(self.kernel_axes)
    return jnp.moveaxis(kernel, self.kernel_axes, tuple(range(k))).reshape(self.d_in, -1)

  def from_matrix(self, matrix: jax.Array) -> jax.Array:
    """Inverse of `to_matrix`."""
    k = len(self.kernel_axes)
    rest = [d for a, d in enumerate(self.kernel_shape) if a not in self.kernel_axes]
    moved = matrix.reshape([self.kernel_shape[a] for a in self.kernel_axes] + rest)
    return jnp.moveaxis(moved, tuple(range(k)), self.kernel_axes)

  def rows(self, x: jax.Array) -> jax.Array:
    """A layer input as rows [tokens, d_in], features in the kernel's order."""
    k = len(self.input_axes)
    return sharding.rows(jnp.moveaxis(x, self.input_axes, tuple(range(-k, 0))), self.d_in)


# --- finding layers and their contractions -----------------------------------


def _einsum_axes(spec: str, owner: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(kernel axes, input axes) contracted by an einsum ``"lhs,kernel->out"``."""
  spec = spec.replace(" ", "")
  try:
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
  except ValueError:
    raise ValueError(f"{owner}: einsum {spec!r} must read 'input,kernel->output'") from None
  if "..." in rhs:
    raise ValueError(f"{owner}: einsum {spec!r} has '...' in the kernel; not supported")
  before, ellipsis, after = lhs.partition("...")
  if ellipsis:  # letters after '...' count from the end
    positions = {c: i for i, c in enumerate(before)}
    positions.update({c: i - len(after) for i, c in enumerate(after)})
  else:
    positions = {c: i - len(lhs) for i, c in enumerate(lhs)}
  contracted = [c for c in rhs if c in positions and c not in out]
  batched = [c for c in rhs if c in positions and c in out]
  if batched:
    raise ValueError(f"{owner}: einsum {spec!r} has batch dims {batched} shared by input, kernel "
                     "and output; a layer with batched kernels cannot be calibrated. Leave it "
                     "out with where=")
  if not contracted:
    raise ValueError(f"{owner}: einsum {spec!r} contracts no input dim with the kernel")
  return tuple(rhs.index(c) for c in contracted), tuple(positions[c] for c in contracted)


def _negative(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(int(a) % ndim - ndim for a in axes)


def _contraction(module: Any, kernel_shape: tuple[int, ...], x: Any, args, kwargs,
                 owner: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """How `module`'s first input contracts with its kernel."""
  name = type(module).__name__
  ndim = jnp.ndim(x)
  lib = _flax_types()
  if isinstance(module, lib["einsum"]):
    spec = (args[0] if args else kwargs.get("einsum_str")) or module.einsum_str
    kernel_axes, input_axes = _einsum_axes(spec, owner)
  elif isinstance(module, lib["general"]):
    if getattr(module, "batch_axis", None) or getattr(module, "batch_dims", ()):
      raise ValueError(f"{owner}: {name} with batch axes cannot be calibrated; leave it out "
                       "with where=")
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    kernel_axes, input_axes = tuple(range(len(axis))), tuple(axis)
  else:  # Dense and every user type
    kernel_axes, input_axes = (0,), (-1,)
  if len(kernel_shape) < len(kernel_axes) + 1 or ndim < len(input_axes):
    raise ValueError(f"{owner}: a kernel of shape {kernel_shape} and an input of shape "
                     f"{jnp.shape(x)} do not contract as a {name}")
  return kernel_axes, _negative(input_axes, ndim)


def _flax_types() -> dict[str, tuple[type, ...]]:
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return {"nnx": (nnx.Linear, nnx.LinearGeneral, nnx.Einsum),
          "linen": (nn.Dense, nn.DenseGeneral, nn.Einsum),
          "einsum": (nnx.Einsum, nn.Einsum),
          "general": (nnx.LinearGeneral, nn.DenseGeneral)}


class _Recorder:
  """Collects the inputs of the target layers during one traced forward pass."""

  def __init__(self, targets: dict[str, tuple[int, ...]]):
    self.targets = targets  # kernel path -> kernel shape
    self.calls: list[tuple[str, Any, tuple, tuple]] = []  # path, x, kernel axes, input axes
    self._inputs: list[Any] = []  # keeps traced inputs alive, so ids stay unique
    self.groups: dict[str, int] = {}
    self.kinds: dict[str, str] = {}
    self._active: set[str] = set()
    self.batch = 0

  def observe(self, path: str, module: Any, args, kwargs, call):
    if path not in self.targets or path in self._active or not args:
      return call()
    x, shape = args[0], self.targets[path]
    owner = f"layer {path} ({type(module).__name__})"
    kernel_axes, input_axes = _contraction(module, shape, x, args[1:], kwargs, owner)
    want = tuple(shape[a] for a in kernel_axes)
    got = tuple(jnp.shape(x)[a] for a in input_axes)
    if want != got:
      raise ValueError(
          f"calibration batch {self.batch}: {owner} takes inputs whose dims {input_axes} are "
          f"{want}, got an input of shape {tuple(jnp.shape(x))}. Batches must be the model's "
          "own inputs (an array, or a tuple of its positional arguments).")
    ids = [i for i, seen in enumerate(self._inputs) if seen is x]
    if ids:
      group = ids[0]
    else:
      self._inputs.append(x)
      group = len(self._inputs) - 1
    self.groups.setdefault(path, group)
    self.kinds.setdefault(path, type(module).__name__)
    self.calls.append((path, x, kernel_axes, input_axes))
    self._active.add(path)
    try:
      return call()
    finally:
      self._active.discard(path)


_RECORDER: list[_Recorder] = []


@contextlib.contextmanager
def _patched_nnx(types: tuple[type, ...], paths: dict[int, str]):
  """Routes `__call__` of `types` through the active recorder (nnx has no interceptor)."""
  saved = {}

  def wrap(original):
    def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
      path = paths.get(id(self))
      if not _RECORDER or path is None:
        return original(self, *args, **kwargs)
      return _RECORDER[-1].observe(path, self, args, kwargs,
                                   lambda: original(self, *args, **kwargs))
    return __call__

  try:
    for cls in types:
      saved[cls] = cls.__dict__.get("__call__")
      cls.__call__ = wrap(cls.__call__)
    yield
  finally:
    for cls, original in saved.items():
      if original is None:
        del cls.__call__
      else:
        cls.__call__ = original


def _is_nnx_module(model: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(model, nnx.Module)


def _is_linen_module(model: Any) -> bool:
  linen = sys.modules.get("flax.linen")
  return linen is not None and isinstance(model, linen.Module)


class _Runner:
  """Runs the model on params with a recorder on chosen layers."""

  def __init__(self, model, variables, types, where):
    self.kind = "nnx" if _is_nnx_module(model) else "linen"
    if self.kind == "nnx":
      from flax import nnx  # pylint: disable=g-import-not-at-top
      self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
      self.types = _flax_types()["nnx"] + tuple(types)
    else:
      self.module, self.variables = model, dict(variables)
      self.params = self.variables["params"]
      self.types = _flax_types()["linen"] + tuple(types)
    leaves, _ = pytree.flatten(self.params)
    self.shapes = {pytree.path_str(p): tuple(jnp.shape(pytree.unwrap(v))) for p, v in leaves}
    where_fn = pytree.as_where(where)
    self.selected = {pytree.path_str(p) for p, v in leaves if v is not None and where_fn(p, v)}

  def run(self, params, args, recorder: _Recorder):
    _RECORDER.append(recorder)
    try:
      if self.kind == "nnx":
        return self._run_nnx(params, args)
      return self._run_linen(params, args)
    finally:
      _RECORDER.pop()

  def _run_nnx(self, params, args):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.merge(self.graphdef, params, self.rest)
    paths = {}
    for path, module in nnx.iter_modules(model):
      if isinstance(module, self.types):
        kernel = "/".join(str(k) for k in path + ("kernel",))
        if kernel in self.shapes and kernel in self.selected:
          paths[id(module)] = kernel
    with _patched_nnx(self.types, paths):
      return model(*args)

  def _run_linen(self, params, args):
    from flax import linen as nn  # pylint: disable=g-import-not-at-top

    def interceptor(next_fun, call_args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not isinstance(module, self.types):
        return next_fun(*call_args, **kwargs)
      kernel = "/".join(module.path + ("kernel",))
      if kernel not in self.shapes or kernel not in self.selected:
        return next_fun(*call_args, **kwargs)
      return _RECORDER[-1].observe(kernel, module, call_args, kwargs,
                                   lambda: next_fun(*call_args, **kwargs))

    with nn.intercept_methods(interceptor):
      return self.module.apply({**self.variables, "params": params}, *args)

  def module_paths(self) -> dict[str, str]:
    """Kernel path -> class name of every selected layer of the calibrated types."""
    if self.kind != "nnx":
      return {}
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.merge(self.graphdef, self.params, self.rest)
    out = {}
    for path, module in nnx.iter_modules(model):
      kernel = "/".join(str(k) for k in path + ("kernel",))
      if isinstance(module, self.types) and kernel in self.selected:
        out[kernel] = type(module).__name__
    return out


def _as_args(batch: Any) -> tuple[Any, ...]:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """What `calibrate` found: the calibrated layers and their input statistics.

  Attributes:
    stats: a pytree with the structure of the params: `LayerStats` at every
      calibrated kernel, None elsewhere.
    layers: the calibrated layers (`Layer`), in the order the model calls them.
  """

  stats: PyTree
  layers: tuple[Layer, ...]
  _runner: _Runner = dataclasses.field(repr=False)
  _batches: tuple[tuple[Any, ...], ...] = dataclasses.field(repr=False)
  _options: tuple[bool, bool] = dataclasses.field(repr=False)  # gram, histogram
  _steps: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled, per group

  def _flat(self):
    return jax.tree_util.tree_flatten_with_path(
        self.stats, is_leaf=lambda x: x is None or isinstance(x, LayerStats))

  def __getitem__(self, path: str) -> LayerStats:
    """The `LayerStats` of the layer whose kernel path is `path`."""
    found = {pytree.path_str(p): v for p, v in self._flat()[0] if isinstance(v, LayerStats)}
    if path not in found:
      raise KeyError(f"no calibrated layer has kernel path {path!r}; calibrated: "
                     f"{[l.path for l in self.layers]}")
    return found[path]

  def paired(self, by_path: dict[str, Any]) -> PyTree:
    """A tree with the params' structure: ``by_path[path]`` at each kernel path, None elsewhere."""
    leaves, treedef = self._flat()
    return jax.tree_util.tree_unflatten(treedef, [by_path.get(pytree.path_str(p)) for p, _ in leaves])

  @property
  def has_gram(self) -> bool:
    """Whether `stats` hold ``X^T X`` (``calibrate(gram=True)``)."""
    return self._options[0]

  @property
  def has_histogram(self) -> bool:
    """Whether `stats` hold the ``|X|`` histograms (``calibrate(histogram=True)``)."""
    return self._options[1]

  @property
  def groups(self) -> list[list[Layer]]:
    """Layers grouped by shared input, in call order."""
    out: dict[int, list[Layer]] = {}
    for layer in self.layers:
      out.setdefault(layer.group, []).append(layer)
    return list(out.values())

  def collect(self, params: PyTree, paths: Iterable[str]) -> dict[str, LayerStats]:
    """Statistics of the layers at `paths`, run on the calibration batches with `params`."""
    paths = set(paths)
    layers = tuple(l for l in self.layers if l.path in paths)
    if layers not in self._steps:
      self._steps[layers] = _stats_step(self._runner, layers)
    return _collect(self._steps[layers], params, self._batches, layers, *self._options)


def _stats_step(runner: _Runner, layers: Sequence[Layer]):
  """A jitted ``step(params, stats, args) -> stats`` adding one batch for `layers`."""
  targets = {l.path: l.kernel_shape for l in layers}
  by_path = {l.path: l for l in layers}

  @jax.jit
  def step(params, stats, args):
    recorder = _Recorder(targets)
    runner.run(params, args, recorder)
    stats = dict(stats)
    for path, x, _, _ in recorder.calls:
      stats[path] = _add_rows(stats[path], by_path[path].rows(x))
    return stats

  return step


def _collect(step, params, batches, layers: Sequence[Layer], gram: bool,
             histogram: bool) -> dict[str, LayerStats]:
  stats = {l.path: _zero_stats(l.d_in, gram, histogram) for l in layers}
  for args in batches:
    stats = step(params, stats, args)
  return stats


def _discover(runner: _Runner, params, args) -> list[Layer]:
  recorder = _Recorder({p: runner.shapes[p] for p in runner.selected})

  def forward(params, args):
    runner.run(params, args, recorder)
    return 0

  try:
    jax.eval_shape(forward, params, args)
  except ValueError:
    raise
  except Exception as e:  # a batch the model cannot take at all
    raise ValueError(
        f"calibration batch 0 (shapes {jax.tree.map(jnp.shape, args)}) does not run through "
        f"the model: {type(e).__name__}: {e}. Batches must be the model's own inputs (an array, "
        "or a tuple of its positional arguments).") from e
  layers, seen = [], set()
  for path, x, kernel_axes, input_axes in recorder.calls:
    del x
    if path in seen:
      continue
    seen.add(path)
    layers.append(Layer(path, recorder.kinds[path], runner.shapes[path], kernel_axes,
                        input_axes, recorder.groups[path]))
  # Group ids in call order.
  renumber: dict[int, int] = {}
  for layer in layers:
    renumber.setdefault(layer.group, len(renumber))
  return [dataclasses.replace(l, group=renumber[l.group]) for l in layers]


def calibrate(
    model: Any,
    batches: Iterable[Any],
    *,
    variables: PyTree | None = None,
    where: pytree.Where | str | Sequence[str] | None = None,
    types: Sequence[type] = (),
    gram: bool = True,
    histogram: bool = False,
) -> Calibration:
  """Per-layer input statistics of `model` over calibration `batches`.

  Args:
    model: a flax nnx Module, or a linen Module (or its bound ``apply``) with
      its `variables`.
    batches: the model's inputs, one per forward pass: arrays, or tuples of
      positional arguments. They are kept (as given) so sequential pruning
      can rerun them; activations are not.
    variables: for a linen Module, the variables passed to ``apply``
      (``{"params": ...}``); None for nnx.
    where: which layers to calibrate, as in `sparsify`: path patterns or a
      filter on kernel paths, e.g. ``where=r"^(?!head/)"``. Default: every
      linear layer of the types below.
    types: extra module types to calibrate, read as Dense layers
      (``x[..., d_in] @ kernel[d_in, ...]``, the weight in a param ``kernel``).
    gram: also accumulate ``X^T X`` (SparseGPT and DSnoT need it; Wanda and
      OWL do not, and it costs d_in^2 floats per layer).
    histogram: also count ``|X_j|`` per feature on a logarithmic grid
      (activation sparsity's thresholds need it; `HIST_BINS` floats per feature).

  Returns:
    a `Calibration`: `LayerStats` per calibrated kernel, paired with the params
    (``nnx.state(model, nnx.Param)`` or ``variables["params"]``).

  Example:
    >>> calibration = sj.calibrate(model, [x[i:i + 32] for i in range(0, 256, 32)])
    >>> masks = sj.prune.wanda(model, calibration, sparsity=0.5)
  """
  if callable(model) and getattr(model, "__name__", "") == "apply" and _is_linen_module(
      getattr(model, "__self__", None)):
    model = model.__self__  # a linen Module's bound `apply`
  if _is_nnx_module(model):
    if variables is not None:
      raise ValueError("calibrate: variables= is for linen Modules; an nnx Module holds its own")
  elif _is_linen_module(model):
    if not isinstance(variables, dict) or "params" not in variables:
      raise ValueError("calibrate: a linen Module needs variables={'params': ...} (what "
                       f"model.init returned), got {type(variables).__name__}")
  else:
    raise ValueError(f"calibrate: model must be a flax nnx Module or a linen Module, got "
                     f"{type(model).__name__}")
  for t in types:
    if not isinstance(t, type):
      raise ValueError(f"calibrate: types must be module classes, got {t!r}")
  for name, value in [("gram", gram), ("histogram", histogram)]:
    if not isinstance(value, bool):
      raise ValueError(f"calibrate: {name}={value!r} must be a bool")
  batches = tuple(_as_args(b) for b in batches)
  if not batches:
    raise ValueError("calibrate: batches is empty; give at least one batch of model inputs")
  structure = jax.tree.structure(batches[0])
  for i, args in enumerate(batches):
    if jax.tree.structure(args) != structure:
      raise ValueError(f"calibration batch {i} has structure {jax.tree.structure(args)}; batch 0 "
                       f"has {structure}: every batch must pass the same arguments")
  runner = _Runner(model, variables, types, where)
  present = runner.module_paths()  # nnx only: linen submodules exist only while running
  layers = _discover(runner, runner.params, batches[0])
  missing = sorted(set(present) - {l.path for l in layers})
  if missing:
    raise ValueError(
        f"calibrate: layers {missing} have no statistics: the model never called them on the "
        "calibration batches. Leave them out with where=, or give batches that reach them.")
  if not layers:
    raise ValueError(
        "calibrate: the model called no layer to calibrate (types: "
        f"{[t.__name__ for t in runner.types]}, where={where!r}). Pass types= for custom layers.")
  stats = _collect(_stats_step(runner, layers), runner.params, batches, layers, gram, histogram)
  leaves, treedef = pytree.flatten(runner.params)
  tree = jax.tree_util.tree_unflatten(
      treedef, [stats.get(pytree.path_str(p)) for p, _ in leaves])
  return Calibration(tree, tuple(layers), runner, batches, (gram, histogram))


# --- what every rule that reads a calibration checks -------------------------

def check_sparsity(sparsity: Any) -> None:
  """A float in [0, 1), or a tree of them (per-layer sparsities)."""
  if is_scalar(sparsity):
    _checks.fraction("sparsity", sparsity, schedule=False)
    return
  if callable(sparsity):
    raise ValueError("sparsity: post-training pruning is one-shot; a schedule has no step to "
                     "follow. Give a float, or per-layer sparsities from sj.prune.owl")
  for path, s in pytree.flatten(sparsity)[0]:
    if s is not None:
      _checks.fraction(f"sparsity{jax.tree_util.keystr(path)}", s, schedule=False)


def is_scalar(sparsity: Any) -> bool:
  """One sparsity for every layer (a number or a 0-d array), not a per-layer tree."""
  return isinstance(sparsity, (int, float, np.integer, np.floating)) or (
      isinstance(sparsity, jax.Array) and sparsity.ndim == 0)


def as_params(params: Any) -> Any:
  """The params tree of an nnx Module (``nnx.state(model, nnx.Param)``), or `params`."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(params, nnx.Module):
    return nnx.state(params, nnx.Param)
  return params


def kernel_matrices(owner: str, params: Any, calibration: Calibration) -> dict[str, jax.Array]:
  """Each calibrated layer's kernel in `params` (or a Module) as a float32 [d_in, d_out] matrix, by path."""
  found = {pytree.path_str(p): pytree.unwrap(v) for p, v in pytree.flatten(as_params(params))[0]}
  out = {}
  for layer in calibration.layers:
    kernel = found.get(layer.path)
    if kernel is None or tuple(jnp.shape(kernel)) != layer.kernel_shape:
      raise ValueError(f"{owner}: params has no kernel of shape {layer.kernel_shape} at "
                       f"{layer.path}; give the params (or model) that was calibrated")
    out[layer.path] = layer.to_matrix(jnp.asarray(kernel, jnp.float32))
  return out


def check_calibration(owner: str, calibration: Any) -> Calibration:
  if not isinstance(calibration, Calibration):
    raise ValueError(f"{owner}: calibration must be what sj.calibrate returned, got "
                     f"{type(calibration).__name__}")
  return calibration


def layer_sparsities(owner: str, sparsity: Any, layers) -> dict[str, Any]:
  """Sparsity per layer path: one float for all, or read (by path) from a per-layer tree."""
  if sparsity is None:
    return {l.path: None for l in layers}
  if is_scalar(sparsity):
    return {l.path: sparsity for l in layers}
  found = {pytree.path_str(p): s for p, s in pytree.flatten(sparsity)[0]}
  paths = {l.path for l in layers}
  for path, s in found.items():
    if s is not None and path not in paths:
      raise ValueError(f"{owner}: sparsity gives {path} a sparsity but the layer has no "
                       f"calibration statistics (calibrated: {sorted(paths)})")
  out = {}
  for l in layers:
    if found.get(l.path) is None:
      raise ValueError(f"{owner}: the per-layer sparsity has no value for calibrated layer "
                       f"{l.path}")
    out[l.path] = found[l.path]
  return out

