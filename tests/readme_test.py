"""The README's quick start runs as written and does what it says."""

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_block(marker, *, broadcasts=False):
  """Runs the README's python block after ``<!-- marker``; returns its globals.

  `broadcasts`: the block broadcasts across ranks (biases, as user code does),
  so it runs with rank promotion allowed.
  """
  readme = (ROOT / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme.split(f"<!-- {marker}")[1], re.S).group(1)
  scope = {}
  with jax.numpy_rank_promotion("allow" if broadcasts else "raise"):
    exec(compile(code, f"README {marker}", "exec"), scope)  # pylint: disable=exec-used
  return scope


def test_quickstart_runs(capsys):
  scope = run_block("quickstart", broadcasts=True)
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  masks, params = sj.get_masks(scope["state"]), scope["params"]
  # Past end_step the kernels hold exactly their ERK share of a 90% target.
  kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
  assert abs(kept - 0.1 * (64 * 256 + 256 * 10)) <= 1
  for m, p in [(masks["hidden"]["kernel"], params["hidden"]["kernel"]),
               (masks["out"]["kernel"], params["out"]["kernel"])]:
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
  assert "total (sparsified leaves)" in capsys.readouterr().out


def test_writing_a_method_blocks_run():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Writing a method")[1].split("\n## ")[0]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.arange(64.0).reshape(8, 8) / 64}
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  # The drop-and-grow variant keeps 10% of 64 from init on; gradient pruning
  # keeps all 64 until its first update, at step 50, then half.
  expected = [{1: 6, 50: 6}, {1: 64, 49: 64, 50: 32}]
  assert len(blocks) == len(expected)
  for code, counts in zip(blocks, expected):
    scope = {"jax": jax, "jnp": jnp, "sj": sj}
    exec(compile(code, "README method", "exec"), scope)  # pylint: disable=exec-used
    method = scope["method"] if "method" in scope else scope["gradient_pruning"](0.5)
    tx = sj.sparsify(optax.sgd(0.1), method)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(1, 51):
      _, state = update(params, state, params)
      if step in counts:
        assert int(sj.get_masks(state)["w"].sum()) == counts[step], (code[:40], step)


def test_block_sparse_section_runs():
  scope = run_block("blocksparse", broadcasts=True)
  np.testing.assert_allclose(np.asarray(scope["y"]), 128.0)  # half of 256 ones
  assert scope["layer"].layout is not None  # converted: the RigL-free kernel is all blocks
  assert scope["fly"](np.ones((2, 256), np.float32)).shape == (2, 256)


def test_post_training_section_runs():
  scope = run_block("posttraining")
  model, wanda = scope["model"], scope["wanda"]
  up = np.asarray(model.up.kernel.get_value())
  assert np.all((up != 0).reshape(8, 4, 128).sum(1) <= 2)  # 2:4 along the inputs
  assert np.array_equal(up != 0, np.asarray(scope["masks"]["up"]["kernel"]))
  kept = sum(int(np.asarray(wanda[k]["kernel"]).sum()) for k in ("up", "down"))
  assert abs(kept - 0.3 * 2 * 32 * 128) <= 2 * 128  # per-output rounding of per-layer sparsities


def test_activations_block_runs(capsys):
  scope = run_block("activations", broadcasts=True)
  out = capsys.readouterr().out
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  reached = sj.activations.input_sparsity(scope["held_out"], scope["thresholds"])
  assert set(reached) == {"up/kernel", "down/kernel"} and "up/kernel" in out
  assert all(abs(float(v) - 0.5) <= 0.03 for v in reached.values()), reached
  # The sparse model is the dense one on inputs zeroed at or below their thresholds.
  model, x = scope["model"], scope["batches"][5][:1]
  t = scope["thresholds"]
  up, down = model.up, model.down
  with jax.numpy_rank_promotion("allow"):
    h = jax.nn.gelu(up(np.where(np.abs(x) <= np.asarray(t["up"]["kernel"]), 0, x)))
    want = down(np.where(np.abs(h) <= np.asarray(t["down"]["kernel"]), 0, h))
  np.testing.assert_allclose(scope["y"], want, rtol=1e-5, atol=1e-5)
  assert float(np.mean(np.asarray(scope["h"]) == 0)) >= 0.75


def test_attention_mods_section_runs(monkeypatch):
  """The packed-documents block runs, and its gradients equal the reference implementation's."""
  scope = run_block("attentionmods")
  d_bias, d_sinks = scope["d_bias"], scope["d_sinks"]
  assert d_bias.shape == (4, 512) and d_sinks.shape == (4,)
  # Causal: only offsets i - j >= 0 get a gradient; every row holds several documents.
  assert float(abs(d_bias[:, :256]).max()) == 0.0 and float(abs(d_bias).max()) > 0
  assert int(scope["ids"][:, -1].min()) > 1
  sja = scope["sja"]
  attend = sja.block_sparse_attention
  monkeypatch.setattr(sja, "block_sparse_attention",
                      lambda *a, **kw: attend(*a, **kw, implementation="reference"))
  want = jax.grad(scope["loss"], argnums=(0, 1))(scope["bias"], np.zeros(4, np.float32))
  np.testing.assert_allclose(d_bias, want[0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(d_sinks, want[1], rtol=2e-4, atol=2e-4)


def test_serving_block_runs(capsys):
  scope = run_block("serving")
  kept, recall = (float(x) for x in capsys.readouterr().out.split())
  assert 0 < kept < 0.2 and 0 < recall <= 1
  cache = scope["cache"]
  assert int(cache.dropped.sum()) == 0 and int((cache.page_table >= 0).sum(-1).max()) <= 12


def test_finetune_block_runs(capsys):
  scope = run_block("finetune", broadcasts=True)
  loss, base, params = scope["loss"], scope["base"], scope["params"]
  with jax.numpy_rank_promotion("allow"):  # the block's loss broadcasts its bias
    assert float(loss(params)) < float(loss(base))
  ours, adam = (int(x) for x in capsys.readouterr().out.split())
  assert ours < adam / 10
  np.testing.assert_allclose(scope["merged"]["w"], params["w"], atol=1e-5)
  assert int((params["w"] != base["w"]).sum()) <= 2 * round(0.03 * 256 * 128)
