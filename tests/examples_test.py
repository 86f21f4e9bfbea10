"""The README's main example runs end to end (a short run)."""

import atexit
import functools
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent JAX compilation cache for the example runs of this test
# process, fresh each session: the runs compile the same small programs (data,
# model init, the many eager ops of mask set-up), most of their time, and a
# run then compiles only what is new to it. Per process, so no two writers
# share it (xdist workers get one each); executables are keyed by their HLO,
# so a changed library or example recompiles.
_TMP = tempfile.mkdtemp(prefix="sparsejax-examples-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
_CACHE = os.path.join(_TMP, "jax_cache")
_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": _CACHE,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def run_example(name, *flags, cwd):
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / name), *flags],
      capture_output=True, text=True, timeout=300, cwd=cwd,
      env={**os.environ, **_CACHE_ENV, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@functools.cache
def digits_npz():
  """The examples' digits split, saved once as an .npz for --dataset=npz.

  The runs then skip importing scikit-learn, and the example's npz path is
  exercised; values are in [0, 1], which the npz loader keeps as they are.
  """
  common = _examples_common()
  x_train, y_train, x_test, y_test = common.load_data("digits", seed=0)
  path = os.path.join(_TMP, "digits.npz")
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def _examples_common():
  spec = importlib.util.spec_from_file_location("_examples_common",
                                                ROOT / "examples" / "_common.py")
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  return common


def test_every_example_method_trains_one_step():
  """Every --method the examples accept builds and takes a step (the runs below train some)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  common = _examples_common()
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 4))}}
  for name in common.METHODS:
    if name == "dense":
      continue
    method = common.make_method(name, 0.5, "erk", 100, jax.random.key(0))
    tx = sj.sparsify(optax.sgd(0.1), method)
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params), name


# One of each kind the example handles differently (dense, gradual pruning, one
# shot, drop-and-grow, constant fan-in, N:M); the other methods share their paths.
@pytest.mark.parametrize("method", ["dense", "magnitude", "snip", "rigl", "srigl", "n_m"])
def test_train_mlp_runs(method, tmp_path):
  plot = tmp_path / "curve.png"
  out = run_example("train_mlp.py", f"--method={method}", "--epochs=3", "--sparsity=0.8",
                    "--dataset=npz", f"--data_path={digits_npz()}", "--plot",
                    f"--plot_path={plot}", cwd=tmp_path)
  assert "on npz: 1437 train / 360 test" in out  # the digits split
  assert "epoch   3" in out and "final test accuracy" in out
  accuracy = float(out.split("final test accuracy:")[1].split()[0])
  assert accuracy > 0.5  # 10 classes: chance is 0.1
  if method == "dense":
    assert "total (all leaves)" in out
  else:
    # Three epochs reach the target for every method (ERK and SRigL round per
    # leaf and per neuron; a kept weight can be exactly 0, so nnz <= budget).
    line = next(l for l in out.splitlines() if l.startswith("total (sparsified leaves)"))
    target = 0.5 if method == "n_m" else 0.2  # n_m runs 2:4 by default
    # Weights grown at the last updates can still be exactly 0 (an input that
    # is always 0 in digits gives them no gradient), so nnz may fall short.
    assert -0.02 < float(line.split()[-1]) - target < 0.01
    if method == "n_m":
      assert "mask flips" in out
  assert plot.stat().st_size > 1000


def test_train_mlp_with_blocks(tmp_path):
  out = run_example("train_mlp.py", "--method=rigl", "--granularity=block", "--epochs=2",
                    cwd=tmp_path)
  kernel = next(l for l in out.splitlines() if l.startswith("hidden1/kernel"))
  assert kernel.split()[-1] == "sparse" and "out/kernel" in out
  # Block-sparse inference over the kept tiles gives the same accuracy.
  final = out.split("final test accuracy:")[1].split()[0]
  line = next(l for l in out.splitlines() if l.startswith("block-sparse inference"))
  assert f"test acc {final}" in line and "hidden1" in line


def test_compare_methods_writes_table_and_plot(tmp_path):
  out = run_example("compare_methods.py", "--methods=rigl,snip", "--sparsities=0.9",
                    "--patterns=2:4,1:8", "--estimators=sr_ste", "--seeds=2", "--epochs=2",
                    "--output=cmp", cwd=tmp_path)
  table = (tmp_path / "cmp.md").read_text()
  assert "| rigl | " in table and "| snip | " in table and "90% sparse" in table
  assert "| sr_ste | " in table and "| 2:4 | 1:8 |" in table
  assert (tmp_path / "cmp.png").stat().st_size > 1000
  assert "dense:" in out


def test_train_lm_runs_every_kind(tmp_path):
  out = run_example("train_lm.py", "--attention=s2,topk", "--ffn=rigl,n_m,block",
                    "--steps=4", "--seq=64", "--block=16", "--window=16", "--k_blocks=2",
                    "--dim=32", "--heads=2", "--layers=1", "--batch=4", "--eval_batches=2",
                    "--ffn_sparsity=0.5", "--plot_path=lm.png", "--documents", cwd=tmp_path)
  assert "packed documents:" in out  # attention within documents, by segment ids
  cells = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
  rows = {(c[0], c[2], c[3]): c for c in cells[2:]}  # (attention, FFN, FFN sparsity)
  assert len(rows) == 6  # the dense baseline, 2 attention kinds, 3 FFN kinds
  # Exact FFN sparsity: RigL and block RigL at 0.5, N:M 2:4.
  for key in [("dense", "dense", "0.000"), ("s2", "dense", "0.000"), ("topk", "dense", "0.000"),
              ("dense", "rigl", "0.500"), ("dense", "n_m", "0.500"), ("dense", "block", "0.500")]:
    assert key in rows, (key, list(rows))
    assert 0 < float(rows[key][4]) < 6  # val loss in nats per byte (uniform: 5.55)
  assert float(rows[("topk", "dense", "0.000")][1]) == 0.5  # 2 of 4 key blocks
  # Block-sparse inference over the kept tiles gives the same loss.
  line = next(l for l in out.splitlines() if "block-sparse inference" in l)
  assert line.split("val loss ")[1].split()[0] == line.split("val loss ")[2].split()[0]
  assert (tmp_path / "lm.png").stat().st_size > 1000


def test_lottery_keeps_masks_in_soups(tmp_path):
  out = run_example("lottery.py", "--rounds=2", "--steps=30", "--rewind_step=10",
                    "--soup_size=2", cwd=tmp_path)
  assert out.count("(mask kept exactly)") == 2
  table = [l.split(" | ") for l in out.splitlines() if l.startswith("| 1 ") or l.startswith("| 2 ")]
  assert [row[1] for row in table] == ["0.500", "0.750"]  # ticket sparsity per round
  assert [row[3] for row in table] == ["0.500", "0.750"]  # soup sparsity per round


def test_prune_lm_prints_every_rule_and_recovers(tmp_path):
  flags = ["--steps=20", "--dim=32", "--heads=2", "--layers=1", "--seq=32", "--batch=4",
           "--calibration_batches=1", "--finetune_steps=2", "--eval_batches=1",
           f"--checkpoint={tmp_path / 'ckpt'}", f"--table_path={tmp_path / 'table.md'}",
           f"--plot_path={tmp_path / 'bars.png'}"]
  out = run_example("prune_lm.py", *flags, "--settings=2:4,70%", cwd=tmp_path)
  rows = [l.split("|")[1:3] for l in out.splitlines() if l.startswith(("| 2:4", "| 70%"))]
  rules = ["magnitude", "wanda", "sparsegpt", "wanda+dsnot"]
  assert [[c.strip() for c in r] for r in rows] == (
      [["2:4", r] for r in rules] + [["70%", r] for r in rules + ["owl+wanda"]]), out
  assert "saved the dense model" in out and out.count("pruned kernels keep") in (1, 2)
  assert (tmp_path / "table.md").read_text().count("| 70% |") == 5
  assert (tmp_path / "bars.png").stat().st_size > 1000
  again = run_example("prune_lm.py", *flags, "--settings=50%", "--rules=magnitude",
                      cwd=tmp_path)  # the checkpoint skips training
  assert "restored the dense model" in again and "| 50% | magnitude |" in again


def test_generate_lm_decodes_every_pattern(tmp_path):
  out = run_example("generate_lm.py", "--steps=20", "--dim=32", "--heads=2", "--layers=1",
                    "--seq=32", "--batch=4", "--eval_batches=1", "--page_size=8", "--window=8",
                    "--sink=2", "--shards=2", "--pages=2", "--prompt=8", "--gen_batch=2",
                    "--timed_runs=1", f"--checkpoint={tmp_path / 'ckpt'}",
                    f"--plot_path={tmp_path / 'loss_kv.png'}", cwd=tmp_path)
  # Dense decoding with the cache reproduces the model's full-sequence loss.
  line = next(l for l in out.splitlines() if l.startswith("dense decode:"))
  decoded = float(line.split("teacher-forced val loss ")[1].split(",")[0])
  full = float(line.split("full-sequence ")[1].split()[0])
  assert abs(decoded - full) < 1e-4, line
  cells = [l.strip("| ").split(" | ") for l in out.splitlines() if l.startswith("| ")]
  rows = {c[0]: c for c in cells[2:]}
  assert list(rows) == ["dense", "local", "ashape", "s2", "topk_pages"], out
  assert float(rows["dense"][1]) == round(decoded, 4)
  for name, row in rows.items():
    assert 0 < float(row[1]) < 6 and float(row[7]) > 0, row  # loss in nats/byte; tokens/s
  # Pruned caches hold less than dense (32 bytes: 4 pages of 8 per head).
  dense_kv = float(rows["dense"][3])
  for name in ("local", "ashape", "s2"):
    assert float(rows[name][3]) < dense_kv and float(rows[name][4]) < 1, rows[name]
  assert rows["topk_pages"][3] == rows["dense"][3] and rows["topk_pages"][5] == "2"
  assert 0 < float(rows["topk_pages"][6]) <= 1  # page recall
  assert (tmp_path / "loss_kv.png").stat().st_size > 1000


def test_finetune_prints_every_method_and_the_merges(tmp_path):
  out = run_example("finetune.py", "--pretrain_steps=60", "--steps=20",
                    f"--plot_path={tmp_path / 'ft.png'}", cwd=tmp_path)
  cells = [l.strip("| ").split(" | ") for l in out.splitlines() if l.startswith("| ")]
  rows = {c[0]: c for c in cells if c[0] not in ("method", "model", "---")}
  methods = ["full", "lora", "spiel", "lt_sft", "s2ft", "sparse_lowrank"]
  merges = [f"{kind} {what}" for kind in ("spiel", "full") for what in (
      "0-4 delta" if kind == "spiel" else "0-4 task vector",
      "5-9 delta" if kind == "spiel" else "5-9 task vector", "sum", "average")]
  assert list(rows) == methods + ["base"] + merges, out
  for name in methods:
    assert all(0 <= float(a) <= 1 for a in rows[name][3:5]), rows[name]
  for name in list(rows)[len(methods):]:
    assert all(0 <= float(a) <= 1 for a in rows[name][1:3]), rows[name]
  # A budget of 3% of the kernels: optimizer state far below full fine-tuning's.
  full_bytes = int(rows["full"][5])
  for name in methods[1:]:
    assert int(rows[name][5]) < 0.1 * full_bytes, rows[name]
    assert 2 <= float(rows[name][2]) <= 3.5, rows[name]  # % of the kernels trained
  assert (tmp_path / "ft.png").stat().st_size > 1000


def test_finetune_lm_prints_every_method(tmp_path):
  out = run_example("finetune.py", "--model=lm", "--pretrain_steps=20", "--steps=10",
                    "--dim=32", "--heads=2", "--layers=1", "--seq=32", "--batch=4",
                    "--eval_batches=1", f"--plot_path={tmp_path / 'ft_lm.png'}", cwd=tmp_path)
  assert "fine-tuning corpus: the Python reference documentation" in out
  base = float(out.split("): docs loss ")[1].split(",")[0])
  cells = [l.strip("| ").split(" | ") for l in out.splitlines() if l.startswith("| ")]
  assert cells[0][3:5] == ["docs loss (new)", "source loss (old)"], cells[0]
  rows = {c[0]: c for c in cells[2:]}
  methods = ["full", "lora", "spiel", "lt_sft", "s2ft", "sparse_lowrank"]
  assert list(rows) == methods, out  # no merging for the LM
  for name in methods:
    assert all(0 < float(loss) < 8 for loss in rows[name][3:5]), rows[name]  # nats/byte
    assert float(rows[name][3]) < base, (base, rows[name])  # each learns the documentation
  # The attention and FFN kernels only (not the embedding), at about 3%: the
  # optimizer state is far below full fine-tuning's. (Rank 1, the least, is 4%
  # of these small kernels for LoRA and the low-rank term.)
  full_bytes = int(rows["full"][5])
  for name in methods[1:]:
    assert int(rows[name][5]) < 0.1 * full_bytes, rows[name]
    low, high = (2, 6) if name in ("lora", "sparse_lowrank") else (2.5, 3.5)
    assert low <= float(rows[name][2]) <= high, rows[name]  # % of the kernels trained
  assert (tmp_path / "ft_lm.png").stat().st_size > 1000


def test_activation_sparsity_trains_thresholds_and_decodes(tmp_path):
  out = run_example("activation_sparsity.py", "--steps=10", "--dim=32", "--heads=2",
                    "--layers=1", "--seq=32", "--batch=4", "--eval_batches=1",
                    "--calibration_batches=2", "--sparsities=0.25,0.5", "--prompt=8",
                    "--timed_runs=1", f"--plot_path={tmp_path / 'act.png'}", cwd=tmp_path)
  cells = [l.strip("| ").split(" | ") for l in out.splitlines() if l.startswith("| ")]
  trained = {c[0]: c for c in cells if c[0] in ("gelu", "relu2", "topk")}
  assert float(trained["gelu"][3]) == 0 and float(trained["relu2"][3]) > 0.2, trained
  assert abs(float(trained["topk"][3]) - 0.75) < 0.01, trained  # a quarter of the units kept
  free = [c for c in cells if c[0] in ("teal", "teal_greedy", "chess", "wina")]
  assert len(free) == 8, out
  for rule, target, got, loss, _ in free:
    assert abs(float(got) - float(target)) < 0.1 and 0 < float(loss) < 6, (rule, target, got)
  assert "tokens/s" in out.split("decode, batch 1")[1]
  assert (tmp_path / "act.png").stat().st_size > 1000
