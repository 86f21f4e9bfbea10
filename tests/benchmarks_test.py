"""benchmarks/device_check.py: without a GPU, forced at tiny sizes on CPU, and its summaries."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
_spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)  # argparse only at main(): importing runs nothing


def run_script(out, *flags):
  result = subprocess.run([sys.executable, str(SCRIPT), f"--out={out}", *flags],
                          capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  report = json.loads((out / "device_check.json").read_text())
  return result, report, (out / "device_check.md").read_text()


def test_without_gpu_says_so_and_exits_0(tmp_path):
  result, report, md = run_script(tmp_path / "out")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "no GPU found" in result.stdout
  assert list(report["stages"]) == ["environment"]
  assert report["stages"]["environment"]["result"]["backend"] == "cpu"
  assert "No GPU" in md


def test_forced_run_records_every_stage(tmp_path):
  result, report, md = run_script(tmp_path / "out", "--force")
  assert result.returncode == 0, result.stdout[-3000:]
  stages = report["stages"]
  assert list(stages) == list(device_check.STAGES)
  assert {s["status"] for s in stages.values()} == {"ok"}, stages
  for name in device_check.STAGES:
    assert (tmp_path / "out" / stages[name]["log"]).exists()
  tests = stages["tests"]["result"]
  assert tests["counts"] == {"skipped": tests["counts"]["skipped"]}  # compiled classes on CPU
  attention = stages["attention"]["result"]
  assert {r["section"] for r in attention["rows"]} == {"patterns", "mods"}
  assert all(r["fwd_s"] and r["fwd_bwd_s"] for r in attention["rows"]), attention["rows"]
  assert attention["targets"]["full_vs_dense"] and attention["targets"]["sparse_vs_full"]
  assert {r["group"] for r in attention["mods"]} == {"causal", "docs 64"}
  assert {r["density"] for r in stages["matmul"]["result"]["rows"]} == {1.0, 0.5}
  decode = {r["row"]: r for r in stages["decode"]["result"]["rows"]}
  assert len(decode) == 8 and decode["dense jax.nn"]["vs_dense"] == 1.0, decode
  assert all(r["ms"] for r in decode.values()) and decode["top 1/8 pages (Quest)"]["kv_read"] < 0.2
  sparse_input = stages["activation_sparsity"]["result"]["rows"]
  assert {(r["batch"], r["pattern"]) for r in sparse_input} == {
      (1, "random"), (8, "shared"), (8, "independent")}, sparse_input
  assert len(sparse_input) == 9 and all(r["ratio"] for r in sparse_input), sparse_input
  union = {(r["pattern"], r["sparsity"]): r["union"] for r in sparse_input}
  assert union["shared", 90.0] == union["random", 90.0] < 0.11 < 0.5 < union["independent", 90.0]
  for heading in ("## Compiled-kernel tests", "## Attention", "## Matmul", "## Decode",
                  "## Activation sparsity", "docs 64, ids"):
    assert heading in md


def test_a_stage_over_its_limit_is_timed_out(tmp_path):
  (tmp_path / "logs").mkdir()
  command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
  record = device_check.run_stage("slow", command, 2, str(tmp_path), dict(os.environ))
  assert record["status"] == "timed out" and record["seconds"] < 20
  assert record["text"] == "started\n"
  assert (tmp_path / "logs" / "slow.log").read_text() == "started\n"


def _row(pattern, impl, kind, density, fwd, fwd_bwd, section="patterns", group=None,
         error=None, **extra):
  return dict(section=section, seq=4096, head_dim=128, pattern=pattern, impl=impl, kind=kind,
              density=density, fwd_s=fwd, fwd_bwd_s=fwd_bwd, error=error, group=group, **extra)


def test_attention_targets_and_markdown():
  rows = [_row("full", "jax.nn cudnn", "dense", 1.0, 1.0, 3.0),
          _row("full", "pallas mha", "dense", 1.0, 1.1, 3.5),
          _row("full", "pallas_triton", "sparse", 1.0, 1.2, 4.0),
          _row("causal", "pallas_triton", "sparse", 0.5, 0.7, 2.0),
          _row("random_1/8", "pallas_triton", "sparse", 0.125, 0.2, None, error="OOM"),
          _row("causal", "jax.nn cudnn", "dense", 0.5, 0.5, 1.5, "mods", "causal"),
          _row("docs 1024", "jax.nn cudnn mask", "dense", 0.06, 0.8, 2.0, "mods", "docs 1024"),
          _row("docs 1024, ids", "pallas_triton", "sparse", 0.07, None, None, "mods",
               "docs 1024", "NotImplementedError: not yet"),
          _row("docs 1024, layout", "pallas_triton", "sparse", 0.07, 0.1, 0.4, "mods",
               "docs 1024", causal_fwd_bwd_s=1.6)]  # dense causal timed in its rounds
  targets = device_check.attention_targets(rows)
  [full] = targets["full_vs_dense"]
  assert full["dense"] == "jax.nn cudnn" and full["fwd_bwd"] == pytest.approx(4.0 / 3.0)
  causal, random = targets["sparse_vs_full"]
  assert causal["fwd"] == pytest.approx(0.7 / 0.6) and causal["fwd_bwd"] == pytest.approx(1.0)
  assert random["fwd_bwd"] is None
  mods = device_check.mod_table(rows)
  assert [r["fwd_bwd_vs_base"] for r in mods] == [1.0, 1.0, None, 0.2]
  assert mods[1]["fwd_bwd_vs_causal"] == pytest.approx(2.0 / 1.5)
  assert mods[3]["fwd_bwd_vs_causal"] == pytest.approx(0.4 / 1.6)
  report = {"started": "now", "budget_s": 480, "sizes": "gpu", "stages": {
      "attention": {"status": "ok", "result": {"meta": {}, "rows": rows, "targets": targets,
                                               "mods": mods}}}}
  md = device_check.markdown(report)
  assert "| 4096 | 128 | pallas_triton | causal | 0.500 | **1.17x** | 1.00x |" in md
  assert "| 4096 | 128 | pallas_triton | jax.nn cudnn | 1.20x | 1.33x |" in md
  assert "NotImplementedError: not yet" in md


def test_parse_pytest_and_matmul_output():
  tests = device_check.parse_tests(
      "tests/a_test.py::TestPallasTriton::test_x[float32-0.25] PASSED [ 50%]\n"
      "tests/a_test.py::TestPallasTriton::test_y FAILED [100%]\n"
      "FAILED tests/a_test.py::TestPallasTriton::test_y - AssertionError\n"
      "========== 1 failed, 1 passed in 3.2s ==========\n")
  assert tests["counts"] == {"passed": 1, "failed": 1}
  assert tests["failed"] == ["tests/a_test.py::TestPallasTriton::test_y"]
  assert tests["summary"] == "1 failed, 1 passed in 3.2s"
  matmul = device_check.parse_matmul(
      "M=K=N=1024: dense jnp.dot fwd 0.50 ms, fwd+bwd 1.50 ms\n"
      "  0.1250 pallas_triton       0.10     0.200 |      0.40     0.267\n")
  assert matmul["rows"] == [{"size": 1024, "density": 0.125, "impl": "pallas_triton",
                             "fwd_ms": 0.1, "fwd_ratio": 0.2, "fwd_bwd_ms": 0.4,
                             "fwd_bwd_ratio": 0.267, "dense_fwd_ms": 0.5,
                             "dense_fwd_bwd_ms": 1.5}]


def test_parse_activation_sparsity_output():
  rows = device_check.parse_activation_sparsity(
      "     d batch  pattern     sparsity  union  impl           dense ms sparse ms   ratio  note\n"
      "  4096     8  independent      90%  0.574  xla               3.193     2.638  0.826x\n"
      "  4096     1  random           50%  0.500  pallas_triton       n/a  ImportError: no\n"
      "  d  4096, xla           50%: 0.893x (<= 0.65: NOT met); 90%: 0.251x (<= 0.2: NOT met)\n")
  assert rows["rows"] == [
      {"d": 4096, "batch": 8, "pattern": "independent", "sparsity": 90.0, "union": 0.574,
       "impl": "xla", "dense_ms": 3.193, "sparse_ms": 2.638, "ratio": 0.826, "note": ""},
      {"d": 4096, "batch": 1, "pattern": "random", "sparsity": 50.0, "union": 0.5,
       "impl": "pallas_triton", "dense_ms": None, "sparse_ms": None, "ratio": None,
       "note": "ImportError: no"}]
  report = {"started": "now", "budget_s": 540, "sizes": "gpu", "stages": {
      "activation_sparsity": {"status": "ok", "result": rows}}}
  md = device_check.markdown(report)
  assert "| 4096 | 8 | independent | 90% | 0.574 | xla | 3.193 | 2.638 | 0.83x |  |" in md
  assert "| 4096 | 1 | random | 50% | 0.500 | pallas_triton | n/a | n/a |  | ImportError: no |" in md
