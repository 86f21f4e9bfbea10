r"""Where the compiled kernels stand on a GPU: their tests and both benchmarks, one command.

  PYTHONPATH=. python benchmarks/device_check.py --out DIR

Runs six stages, each in its own process under a hard time limit (540 s in
all by default), so one that crashes or overruns is recorded as such and the
rest still run:

  1. environment: python, jax and jaxlib versions, devices, GPU name,
     compute capability, cuDNN version;
  2. tests: the compiled-kernel test classes of tests/attention_test.py,
     tests/attention_mods_test.py, tests/matmul_test.py,
     tests/attention_decode_pallas_test.py and tests/sparse_input_pallas_test.py
     (TestPallasTriton, not the interpret-mode subclasses);
  3. attention: benchmarks/attention.py at GPU sizes, beside cuDNN dense
     attention and JAX's Pallas `mha`, with packed documents, soft-cap and
     sinks;
  4. matmul: benchmarks/matmul.py at GPU sizes;
  5. decode: benchmarks/decode.py (a decode step over KV caches, dense,
     pruned by patterns and Quest-selected, beside jax.nn dense attention);
  6. activation_sparsity: benchmarks/activation_sparsity.py
     (sj.matmul.sparse_input_matmul on sparse decode activations, pallas_triton
     and xla, beside dense jnp.dot).

After each stage it rewrites DIR/device_check.json (everything, raw) and
DIR/device_check.md (a summary with the attention targets: the full layout's
fwd+bwd time within 1.5x cuDNN dense, and at density d a time within
1.15 x d x the full layout's); each stage's output is in DIR/logs/.

Without a GPU it says so and exits 0; `--force` runs the stages anyway on
the default backend at tiny sizes (to check this script end to end). Exit
status 1 if a stage failed or timed out.
"""

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("environment", "tests", "attention", "matmul", "decode", "activation_sparsity")
# Each stage's time limit in seconds; a stage also gets what earlier ones left unused.
LIMITS = {"environment": 45, "tests": 150, "attention": 165, "matmul": 60, "decode": 60,
          "activation_sparsity": 60}
TEST_FILES = ("tests/attention_test.py", "tests/attention_mods_test.py", "tests/matmul_test.py",
              "tests/attention_decode_pallas_test.py", "tests/sparse_input_pallas_test.py")
TEST_SELECTION = "TestPallasTriton and not Interpret"  # the compiled Triton classes
# Benchmark flags: "gpu" sized to finish within LIMITS on an H100/H200 class GPU,
# "tiny" to run the whole script on a CPU in seconds.
SIZES = {
    "gpu": {
        "attention": ["--seqs=16384", "--head_dims=128", "--batch=2", "--heads=8",
                      "--patterns=full,causal,local_1024,random_1/8",
                      "--impls=pallas_triton", "--mod_seqs=8192", "--mod_head_dims=128",
                      "--doc_lens=1024,4096", "--repeats=5"],
        "matmul": ["--sizes=1024,4096", "--densities=1,0.25,0.125", "--repeats=5"],
        "decode": ["--kv_lens=16384,131072", "--batches=1,8", "--repeats=5"],
        "activation_sparsity": ["--ds=4096,8192", "--batches=1,8", "--dtype=bfloat16",
                                "--implementations=pallas_triton,xla", "--repeats=5",
                                "--calls=10"],
    },
    "tiny": {
        "attention": ["--seqs=256", "--head_dims=32", "--heads=2", "--patterns=full,causal",
                      "--mod_seqs=256", "--mod_head_dims=32", "--doc_lens=64",
                      "--mods=packed", "--repeats=1"],
        "matmul": ["--sizes=256", "--densities=1,0.5", "--repeats=1"],
        "decode": ["--kv_lens=1024", "--batches=1", "--heads=4", "--head_dim=32",
                   "--window=256", "--repeats=1"],
        "activation_sparsity": ["--ds=256", "--sparsities=0,50,90", "--repeats=1",
                                "--calls=1", "--working_set_mb=0"],
    },
}
FULL_VS_DENSE, SPARSE_VS_FULL = 1.5, 1.15  # the GPU targets

ENV_SCRIPT = r"""
import importlib, json, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("jax", "jaxlib", "numpy", "flax", "optax", "chex", "pytest", "hypothesis"):
  try:
    info[name] = importlib.import_module(name).__version__
  except Exception as e:
    info[name] = f"missing ({type(e).__name__})"
import jax
devices = jax.devices()
info["backend"] = jax.default_backend()
info["devices"] = [str(d) for d in devices]
info["device_kind"] = devices[0].device_kind
info["compute_capability"] = getattr(devices[0], "compute_capability", None)
version = str(getattr(devices[0].client, "platform_version", ""))
info["platform_version"] = version
info["jax_platform"] = ("rocm" if "rocm" in version.lower() else "cuda"
                        if info["backend"] == "gpu" else info["backend"])
try:
  info["memory_gib"] = round(devices[0].memory_stats()["bytes_limit"] / 2**30, 1)
except Exception:
  pass
try:
  from jax._src.lib import cuda_versions
  info["cudnn"] = cuda_versions.cudnn_get_version()
except Exception:
  pass
try:
  info["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
      capture_output=True, text=True, timeout=10).stdout.strip()
except Exception:
  pass
print("DEVICE_CHECK_ENV " + json.dumps(info))
"""


def run_stage(name, command, limit, out, env):
  """Runs `command` in its own process group for at most `limit` seconds, teeing its output.

  Returns the stage record: status ("ok", "failed", "timed out"), seconds,
  return code, the log's path and its text.
  """
  log_path = os.path.join(out, "logs", f"{name}.log")
  shown = " ".join(command if "-c" not in command else command[:command.index("-c") + 1] + ["..."])
  print(f"[{name}] {shown}  (limit {limit} s)", flush=True)
  start = time.monotonic()
  lines = []
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def tee():
      for line in proc.stdout:
        log.write(line)
        log.flush()
        lines.append(line)
        print(f"  [{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    timed_out = False
    try:
      proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
      timed_out = True
      for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
          os.killpg(proc.pid, sig)
          proc.wait(timeout=wait)
          break
        except (ProcessLookupError, subprocess.TimeoutExpired):
          continue
    reader.join(timeout=5)
  seconds = time.monotonic() - start
  status = "timed out" if timed_out else ("ok" if proc.returncode == 0 else "failed")
  print(f"[{name}] {status} after {seconds:.1f} s", flush=True)
  return {"status": status, "seconds": round(seconds, 1), "limit_s": limit,
          "returncode": proc.returncode, "command": shown,
          "log": os.path.relpath(log_path, out), "text": "".join(lines)}


def parse_environment(text):
  for line in text.splitlines():
    if line.startswith("DEVICE_CHECK_ENV "):
      return json.loads(line[len("DEVICE_CHECK_ENV "):])
  return None


def parse_tests(text):
  """Outcome counts and the failing test ids from `pytest -v` output (complete or cut off)."""
  outcomes = {}
  failed = []
  for m in re.finditer(r"^(\S+::\S+(?:\[[^\]]*\])?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)",
                       text, re.M):
    outcomes[m.group(1)] = m.group(2).lower()
  for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M):  # the -ra summary
    failed.append(m.group(1))
  counts = {}
  for outcome in outcomes.values():
    counts[outcome] = counts.get(outcome, 0) + 1
  summary = re.findall(r"^=+ (.*(?:passed|failed|skipped|error|no tests ran).*) =+$", text, re.M)
  failed = sorted(set(failed) | {t for t, o in outcomes.items() if o in ("failed", "error")})
  return {"counts": counts, "failed": failed, "summary": summary[-1] if summary else None}


def parse_matmul(text):
  """Rows of matmul.py's tables (it prints text only)."""
  rows, size, dense = [], None, None
  for line in text.splitlines():
    m = re.match(r"M=K=N=(\d+): dense jnp.dot fwd ([\d.]+) ms, fwd\+bwd ([\d.]+) ms", line)
    if m:
      size, dense = int(m.group(1)), (float(m.group(2)), float(m.group(3)))
      continue
    m = re.match(r"\s*([\d.]+) (\S+)\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+)\s+([\d.]+)\s*$", line)
    if m and size:
      rows.append({"size": size, "density": float(m.group(1)), "impl": m.group(2),
                   "fwd_ms": float(m.group(3)), "fwd_ratio": float(m.group(4)),
                   "fwd_bwd_ms": float(m.group(5)), "fwd_bwd_ratio": float(m.group(6)),
                   "dense_fwd_ms": dense[0], "dense_fwd_bwd_ms": dense[1]})
  return {"rows": rows}


def parse_decode(text):
  """Rows of decode.py's table (it prints text only)."""
  rows = []
  for line in text.splitlines():
    m = re.match(r"\s*(\d+)\s+(\d+)  (.{30}) +([\d.]+) +([\d.]+)x +([\d.]+)  ?(.*)$", line)
    if m:
      rows.append({"kv_len": int(m.group(1)), "batch": int(m.group(2)),
                   "row": m.group(3).strip(), "ms": float(m.group(4)),
                   "vs_dense": float(m.group(5)), "kv_read": float(m.group(6)),
                   "note": m.group(7).strip()})
    m = re.match(r"\s*(\d+)\s+(\d+)  (.{30}) +n/a  (.*)$", line)
    if m:
      rows.append({"kv_len": int(m.group(1)), "batch": int(m.group(2)),
                   "row": m.group(3).strip(), "ms": None, "vs_dense": None, "kv_read": None,
                   "note": m.group(4).strip()})
  return {"rows": rows}


def parse_activation_sparsity(text):
  """Rows of activation_sparsity.py's table (it prints text only)."""
  rows = []
  head = r"\s*(\d+)\s+(\d+)  (\S+)\s+([\d.]+)%\s+([\d.]+)  (\S+)\s+"
  for line in text.splitlines():
    m = re.match(head + r"([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s*$", line)
    n = m or re.match(head + r"n/a  (.*)$", line)
    if n:
      rows.append({"d": int(n.group(1)), "batch": int(n.group(2)), "pattern": n.group(3),
                   "sparsity": float(n.group(4)), "union": float(n.group(5)),
                   "impl": n.group(6),
                   "dense_ms": float(m.group(7)) if m else None,
                   "sparse_ms": float(m.group(8)) if m else None,
                   "ratio": float(m.group(9)) if m else None,
                   "note": "" if m else n.group(7).strip()})
  return {"rows": rows}


def attention_targets(rows):
  """The GPU targets from attention.py's rows: full ÷ cuDNN dense, sparse ÷ (density x full)."""
  full_vs_dense, sparse_vs_full = [], []
  configs = sorted({(r["seq"], r["head_dim"]) for r in rows if r["section"] == "patterns"})
  for seq, dim in configs:
    here = [r for r in rows if r["section"] == "patterns" and (r["seq"], r["head_dim"]) ==
            (seq, dim)]
    dense = [r for r in here if r["kind"] == "dense" and r["pattern"] == "full"]
    dense = next((r for r in dense if "cudnn" in r["impl"]), dense[0] if dense else None)
    for full in (r for r in here if r["kind"] == "sparse" and r["pattern"] == "full"):
      impl = full["impl"]
      if dense:
        full_vs_dense.append({
            "seq": seq, "head_dim": dim, "impl": impl, "dense": dense["impl"],
            "fwd": _div(full["fwd_s"], dense["fwd_s"]),
            "fwd_bwd": _div(full["fwd_bwd_s"], dense["fwd_bwd_s"])})
      for r in here:
        if r["kind"] == "sparse" and r["impl"] == impl and r["pattern"] != "full":
          sparse_vs_full.append({
              "seq": seq, "head_dim": dim, "impl": impl, "pattern": r["pattern"],
              "density": r["density"],
              "fwd": _div(r["fwd_s"], _mul(r["density"], full["fwd_s"])),
              "fwd_bwd": _div(r["fwd_bwd_s"], _mul(r["density"], full["fwd_bwd_s"])),
              "error": r["error"]})
  return {"full_vs_dense": full_vs_dense, "sparse_vs_full": sparse_vs_full}


def mod_table(rows):
  """attention.py's modifier rows with their ratios to the group's dense base and dense causal.

  Dense causal's time is the one timed in the row's own rounds where the row has it.
  """
  out, base, causal = [], {}, {}
  for r in rows:
    if r["section"] != "mods":
      continue
    config = (r["seq"], r["head_dim"])
    causal.setdefault(config, r)
    base.setdefault(config + (r["group"],), r)
    b, c = base[config + (r["group"],)], causal[config]
    out.append(dict(r, base=b["impl"], fwd_vs_base=_div(r["fwd_s"], b["fwd_s"]),
                    fwd_bwd_vs_base=_div(r["fwd_bwd_s"], b["fwd_bwd_s"]),
                    fwd_bwd_vs_causal=_div(r["fwd_bwd_s"],
                                           r.get("causal_fwd_bwd_s", c["fwd_bwd_s"]))))
  return out


def _div(a, b):
  return a / b if a is not None and b else None


def _mul(a, b):
  return a * b if a is not None and b is not None else None


def _x(value, goal=None):
  if value is None:
    return "n/a"
  text = f"{value:.2f}x"
  return text if goal is None or value <= goal else f"**{text}**"


def _na(value):
  return "n/a" if value is None else value


def _ms(seconds):
  return f"{1e3 * seconds:.2f}" if seconds is not None else "n/a"


def markdown(report):
  """The summary of `report` (the JSON's contents) as markdown."""
  env = report["stages"].get("environment", {}).get("result") or {}
  lines = ["# Device check", "",
           f"{report['started']}; {env.get('device_kind', '?')} (compute capability "
           f"{env.get('compute_capability')}, cuDNN {env.get('cudnn')}), jax {env.get('jax')}, "
           f"jaxlib {env.get('jaxlib')}, python {env.get('python')}; sizes: {report['sizes']}; "
           f"budget {report['budget_s']} s.", ""]
  if report.get("note"):
    lines += [report["note"], ""]
  lines += ["| stage | status | seconds | limit | log |", "| --- | --- | ---: | ---: | --- |"]
  for name in STAGES:
    s = report["stages"].get(name)
    if s:
      lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('limit_s', '')} "
                   f"| {s.get('log', '')} |")
  for name, s in report["stages"].items():
    if s["status"] in ("failed", "timed out") and s.get("tail"):
      lines += ["", f"{name} ({s['status']}), end of its output:", "", "```", s["tail"], "```"]
  tests = report["stages"].get("tests", {}).get("result")
  if tests:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "none"
    lines += ["", "## Compiled-kernel tests", "",
              f"`pytest {' '.join(TEST_FILES)} -k \"{TEST_SELECTION}\"`: {counts}"
              f" ({tests['summary'] or 'no pytest summary: cut off?'})."]
    lines += [f"- failed: `{t}`" for t in tests["failed"]]
  attention = report["stages"].get("attention", {}).get("result")
  if attention:
    lines += _attention_markdown(attention)
  matmul = report["stages"].get("matmul", {}).get("result")
  if matmul and matmul["rows"]:
    lines += ["", "## Matmul", "", "Time ÷ dense `jnp.dot` of the same size (ideal: the density).",
              "",
              "| M=K=N | density | impl | fwd ms | fwd ÷ dense | fwd+bwd ms | fwd+bwd ÷ dense |",
              "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['size']} | {r['density']:.4f} | {r['impl']} | {r['fwd_ms']:.2f} | "
              f"{r['fwd_ratio']:.3f}x | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio']:.3f}x |"
              for r in matmul["rows"]]
  decode = report["stages"].get("decode", {}).get("result")
  if decode and decode["rows"]:
    lines += ["", "## Decode", "", "One decode step ÷ `jax.nn.dot_product_attention` over the full "
              "cache; KV read: the share of the cache's bytes a row reads.", "",
              "| kv_len | batch | row | ms | vs dense | KV read | note |",
              "| ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['kv_len']} | {r['batch']} | {r['row']} | "
              f"{'n/a' if r['ms'] is None else r['ms']} | "
              f"{'' if r['vs_dense'] is None else _x(r['vs_dense'])} | "
              f"{'' if r['kv_read'] is None else r['kv_read']} | {r['note'][:120]} |"
              for r in decode["rows"]]
  sparse_input = report["stages"].get("activation_sparsity", {}).get("result")
  if sparse_input and sparse_input["rows"]:
    lines += ["", "## Activation sparsity", "", "`sparse_input_matmul(x, w)` ÷ dense "
              "`jnp.dot(x, w)`, w [d, d]; union: the share of input channels nonzero in some "
              "row (the rows of w read).", "",
              "| d | batch | pattern | sparsity | union | impl | dense ms | sparse ms | ratio | "
              "note |", "| ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['d']} | {r['batch']} | {r['pattern']} | {r['sparsity']:g}% | "
              f"{r['union']:.3f} | {r['impl']} | {_na(r['dense_ms'])} | {_na(r['sparse_ms'])} | "
              f"{'' if r['ratio'] is None else _x(r['ratio'])} | {r['note'][:120]} |"
              for r in sparse_input["rows"]]
  return "\n".join(lines) + "\n"


def _attention_markdown(attention):
  targets, meta = attention["targets"], attention.get("meta", {})
  lines = ["", "## Attention", "",
           f"batch {meta.get('batch')}, heads {meta.get('heads')}, block {meta.get('block')}, "
           f"{meta.get('dtype')}, median of {meta.get('repeats')}. Misses of a target in bold."]
  if targets["full_vs_dense"]:
    lines += ["", f"Full layout ÷ dense full attention (target: fwd+bwd <= {FULL_VS_DENSE}x "
              "cuDNN):", "", "| seq | head_dim | impl | dense | fwd | fwd+bwd |",
              "| ---: | ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {r['seq']} | {r['head_dim']} | {r['impl']} | {r['dense']} | {_x(r['fwd'])} | "
              f"{_x(r['fwd_bwd'], FULL_VS_DENSE)} |" for r in targets["full_vs_dense"]]
  if targets["sparse_vs_full"]:
    lines += ["", f"Time ÷ (density x the full layout's time) (target: <= {SPARSE_VS_FULL}x):",
              "", "| seq | head_dim | impl | pattern | density | fwd | fwd+bwd |",
              "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['seq']} | {r['head_dim']} | {r['impl']} | {r['pattern']} | "
              f"{r['density']:.3f} | {_x(r['fwd'], SPARSE_VS_FULL)} | "
              f"{_x(r['fwd_bwd'], SPARSE_VS_FULL)} |" for r in targets["sparse_vs_full"]]
  patterns = [r for r in attention["rows"] if r["section"] == "patterns"]
  if patterns:
    lines += ["", "Every pattern row:", "",
              "| seq | head_dim | pattern | impl | density | fwd ms | fwd+bwd ms | note |",
              "| ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['seq']} | {r['head_dim']} | {r['pattern']} | {r['impl']} | "
              f"{r['density']:.3f} | {_ms(r['fwd_s'])} | {_ms(r['fwd_bwd_s'])} | "
              f"{(r['error'] or '')[:120]} |" for r in patterns]
  if attention["mods"]:
    lines += ["", "Score modifiers (causal): time ÷ the group's dense base, and fwd+bwd ÷ "
              "dense causal attention's:", "",
              "| seq | head_dim | rows | impl | density | fwd ms | vs base | fwd+bwd ms | vs base "
              "| vs causal | note |",
              "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['seq']} | {r['head_dim']} | {r['pattern']} | {r['impl']} | "
              f"{r['density']:.3f} | {_ms(r['fwd_s'])} | {_x(r['fwd_vs_base'])} | "
              f"{_ms(r['fwd_bwd_s'])} | {_x(r['fwd_bwd_vs_base'])} | "
              f"{_x(r['fwd_bwd_vs_causal'])} | {(r['error'] or '')[:120]} |"
              for r in attention["mods"]]
  return lines


def write(report, out):
  for name, text in (("device_check.json", json.dumps(report, indent=1)),
                     ("device_check.md", markdown(report))):
    path = os.path.join(out, name)
    with open(f"{path}.tmp", "w") as f:
      f.write(text)
    os.replace(f"{path}.tmp", path)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True,
                      help="folder for device_check.json, device_check.md and logs/")
  parser.add_argument("--force", action="store_true",
                      help="without a GPU, run the stages anyway at tiny sizes")
  parser.add_argument("--budget", type=int, default=540, help="seconds for all stages together")
  parser.add_argument("--stages", default="tests,attention,matmul,decode,activation_sparsity",
                      help="stages to run after the environment, comma-separated")
  parser.add_argument("--attention_flags", default="",
                      help="extra flags for attention.py (after the defaults: they override)")
  parser.add_argument("--matmul_flags", default="", help="extra flags for matmul.py")
  parser.add_argument("--decode_flags", default="", help="extra flags for decode.py")
  parser.add_argument("--activation_sparsity_flags", default="",
                      help="extra flags for activation_sparsity.py")
  args = parser.parse_args(argv)
  unknown = set(args.stages.split(",")) - set(STAGES[1:])
  if unknown:
    parser.error(f"--stages: unknown {sorted(unknown)}; expected some of {STAGES[1:]}")
  return args


def main(argv=None):
  args = parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  deadline = time.monotonic() + args.budget
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  report = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv, "budget_s": args.budget, "sizes": None, "stages": {}}

  todo = args.stages.split(",")
  plan = [s for s in STAGES if s == "environment" or s in todo]
  scale = min(1.0, args.budget / sum(LIMITS[s] for s in plan))  # a --budget below the limits

  def stage(name, command, parse, stage_env=env):
    # Its own limit and whatever earlier stages left unused, keeping later stages' limits.
    later = scale * sum(LIMITS[s] for s in plan[plan.index(name) + 1:])
    limit = int(deadline - time.monotonic() - later)
    if limit < 10:
      report["stages"][name] = {"status": "skipped", "reason": "no time left of --budget"}
      write(report, out)
      return None
    record = run_stage(name, command, limit, out, stage_env)
    text = record.pop("text")
    if record["status"] != "ok":
      record["tail"] = text[-3000:]
    try:
      record["result"] = parse(text)
    except Exception as e:  # pylint: disable=broad-exception-caught
      record["result"], record["parse_error"] = None, f"{type(e).__name__}: {e}"
    report["stages"][name] = record
    write(report, out)
    return record["result"]

  info = stage("environment", [sys.executable, "-c", ENV_SCRIPT], parse_environment)
  backend = (info or {}).get("backend")
  if info is None and not args.force:
    report["note"] = "The environment stage found no backend: see logs/environment.log."
    write(report, out)
    print(f"device_check: jax did not start (see {out}/logs/environment.log); nothing else run.")
    return 1
  if backend != "gpu" and not args.force:
    report["note"] = f"No GPU (jax backend: {backend}): nothing else was run."
    write(report, out)
    print(f"device_check: no GPU found (jax backend: {backend}); nothing to check. Run it on a "
          f"machine with a GPU, or pass --force to run every stage here at tiny sizes. "
          f"Wrote {out}/device_check.md.")
    return 0
  sizes = "gpu" if backend == "gpu" else "tiny"
  report["sizes"] = sizes
  platform = (info or {}).get("jax_platform") or "cpu"

  if "tests" in todo:  # conftest.py defaults JAX_PLATFORMS to cpu: name the platform
    stage("tests", [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                    *TEST_FILES, "-k", TEST_SELECTION], parse_tests,
          dict(env, JAX_PLATFORMS=platform))
  if "attention" in todo:
    path = os.path.join(out, "attention.json")
    if os.path.exists(path):
      os.remove(path)

    def parse_attention(text):
      del text
      if not os.path.exists(path):
        return None
      with open(path) as f:
        data = json.load(f)
      return {"meta": data["meta"], "rows": data["rows"], "targets": attention_targets(
          data["rows"]), "mods": mod_table(data["rows"])}

    stage("attention", [sys.executable, os.path.join(ROOT, "benchmarks", "attention.py"),
                        *SIZES[sizes]["attention"], *args.attention_flags.split(),
                        f"--json={path}"], parse_attention)
  if "matmul" in todo:
    stage("matmul", [sys.executable, os.path.join(ROOT, "benchmarks", "matmul.py"),
                     *SIZES[sizes]["matmul"], *args.matmul_flags.split()], parse_matmul)
  if "decode" in todo:
    stage("decode", [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"),
                     *SIZES[sizes]["decode"], *args.decode_flags.split()], parse_decode)
  if "activation_sparsity" in todo:
    stage("activation_sparsity",
          [sys.executable, os.path.join(ROOT, "benchmarks", "activation_sparsity.py"),
           *SIZES[sizes]["activation_sparsity"], *args.activation_sparsity_flags.split()],
          parse_activation_sparsity)
  write(report, out)
  bad = [n for n, s in report["stages"].items() if s["status"] != "ok"]
  print(f"device_check: wrote {out}/device_check.md and device_check.json"
        + (f"; not ok: {', '.join(bad)}" if bad else "; every stage ok"))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
