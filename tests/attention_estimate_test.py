"""MInference's vertical-slash estimate finds planted lines; recall against a NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja
from sparsejax._src.attention import estimate as estimate_lib
from sparsejax._src.attention import layout as layout_lib

from kernel_testing import attention_inputs as inputs

T, DIM, BLOCK, K_BLOCKS = 512, 128, 16, 6
# Per batch element: the key columns of query heads 0 and 1 (sharing key head 0), and the
# diagonals q - kv of query heads 2 and 3 (sharing key head 1). None is a multiple of BLOCK.
VERTICAL = [((3, 70, 181), (40, 130, 222)), ((20, 99, 300), (1, 250, 401))]
SLASH = [((37, 100), (21, 150)), ((60, 211), (9, 333))]


def planted(seed):
  """q [2, T, 4, DIM], k [2, T, 2, DIM]: faint noise, and lines whose logits are 10.

  Heads 0 and 1 share a direction with the keys of their columns (vertical
  lines). Heads 2 and 3 give each query its own direction, which the key
  `offset` positions earlier carries (slash lines).
  """
  rng = np.random.default_rng(seed)
  q = 0.3 * rng.standard_normal((2, T, 4, DIM))
  k = 0.3 * rng.standard_normal((2, T, 2, DIM))
  amplitude = np.sqrt(10 * np.sqrt(DIM))
  for b in range(2):
    direction = np.linalg.qr(rng.standard_normal((DIM, 2)))[0].T  # orthonormal: one per head
    for h in range(2):
      q[b, :, h] += amplitude * direction[h]
      k[b, list(VERTICAL[b][h]), 0] += amplitude * direction[h]
      own = rng.standard_normal((T, DIM))
      own *= amplitude / np.linalg.norm(own, axis=-1, keepdims=True)
      q[b, :, 2 + h] += own
      for offset in SLASH[b][h]:
        k[b, :T - offset, 1] += own[offset:]
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def active_blocks(layout, batch):
  """bool[batch, heads, q_blocks, kv_blocks] on the host."""
  active, _ = layout_lib.block_tables(layout)
  rows = np.broadcast_to(np.asarray(layout.head_row), (batch, layout.num_heads))
  return np.asarray(active)[rows]


def recall_oracle(q, k, covered, mask):
  """NumPy float64: mean over rows with visible keys of the softmax mass in `covered`."""
  group = q.shape[2] // k.shape[2]
  s = np.einsum("bthd,bshd->bhts", np.float64(q), np.repeat(np.float64(k), group, axis=2))
  s = np.where(mask, s / np.sqrt(q.shape[-1]), -np.inf)
  has_keys = mask.any(-1)
  p = np.exp(s - np.where(has_keys, s.max(-1), 0)[..., None])
  rows = (p * covered).sum(-1) / np.where(has_keys, p.sum(-1), 1)
  count = np.broadcast_to(has_keys, rows.shape).sum(-1)
  return np.where(count > 0, (rows * has_keys).sum(-1) / np.maximum(count, 1), 1)


estimate = jax.jit(lambda q, k: sja.estimate_vertical_slash(
    q, k, block_q=BLOCK, block_kv=BLOCK, k_blocks=K_BLOCKS, num_vertical=3, num_slash=2,
    causal=True))
causal_recall = jax.jit(lambda q, k, layout: sja.layout_recall(q, k, layout,
                                                               mask=sja.CausalMask((T, T))))


def test_estimate_finds_planted_columns_and_diagonals():
  q, k = planted(0)
  layout = estimate(q, k)
  active = active_blocks(layout, 2)
  nq = T // BLOCK
  np.testing.assert_array_equal(np.asarray(layout.num_kv).reshape(2, 4, nq),
                                np.broadcast_to(np.minimum(np.arange(nq) + 1, K_BLOCKS),
                                                (2, 4, nq)))  # the budget, exactly
  assert np.all(active[:, :, np.arange(nq), np.arange(nq)])  # the diagonal, always
  for b in range(2):
    for h in range(2):
      for column in VERTICAL[b][h]:
        j = column // BLOCK
        assert active[b, h, j:, j].all(), (b, h, column)
    for h in range(2):
      for offset in SLASH[b][h]:
        rows = np.arange(offset + BLOCK // 2, T, BLOCK)  # a middle row of each query block
        assert active[b, 2 + h, rows // BLOCK, (rows - offset) // BLOCK].all(), (b, h, offset)
  recall = np.asarray(causal_recall(q, k, layout))
  assert recall.shape == (2, 4) and recall.min() > 0.95, recall
  random_q, random_k, _, _ = inputs(1, 2, T, 4, 2, DIM, jnp.float32)
  routed = jax.jit(lambda q, k: sja.topk_layout(  # the same budget, blind to the lines
      q, k, block_q=BLOCK, block_kv=BLOCK, k_blocks=K_BLOCKS, causal=True))(random_q, random_k)
  assert np.all(np.asarray(causal_recall(q, k, routed)) < recall - 0.2)


def test_estimate_without_slash_lines_follows_the_columns():
  q, k = planted(0)
  layout = jax.jit(lambda q, k: sja.estimate_vertical_slash(
      q, k, block_q=BLOCK, block_kv=BLOCK, k_blocks=4, num_vertical=3, num_slash=0,
      causal=True))(q, k)
  active = active_blocks(layout, 2)
  for b in range(2):
    for h in range(2):
      want = np.zeros(T // BLOCK, bool)
      want[[c // BLOCK for c in VERTICAL[b][h]]] = True
      np.testing.assert_array_equal(active[b, h, -1], want | (np.arange(T // BLOCK) == 31))


def test_estimate_without_causality_sees_later_columns():
  q, k = planted(0)
  layout = jax.jit(lambda q, k: sja.estimate_vertical_slash(
      q, k, block_q=32, block_kv=BLOCK, k_blocks=3, num_vertical=3, num_slash=0,
      causal=False))(q, k)
  active = active_blocks(layout, 2)
  assert np.all(np.asarray(layout.kv_partial) == -1)  # no causal diagonal: every block full
  for b in range(2):
    for h in range(2):
      want = np.zeros(T // BLOCK, bool)
      want[[c // BLOCK for c in VERTICAL[b][h]]] = True
      np.testing.assert_array_equal(active[b, h], np.broadcast_to(want, active.shape[2:]))


@pytest.mark.parametrize("q_len, kv_len, block_q, block_kv", [(64, 64, 16, 16), (48, 96, 8, 16),
                                                              (96, 32, 32, 8)])
def test_slash_block_scores_count_each_rows_share(q_len, kv_len, block_q, block_kv):
  slash = np.random.default_rng(7).random((1, 1, q_len + kv_len - 1))
  got = estimate_lib._slash_blocks(jnp.asarray(slash), q_len, kv_len, block_q, block_kv)
  rows, keys = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  mass = slash[0, 0, rows - keys + kv_len - 1]  # each element's diagonal mass
  want = mass.reshape(q_len // block_q, block_q, kv_len // block_kv, block_kv).sum((1, 3))
  np.testing.assert_allclose(got[0, 0], want / block_q, rtol=1e-5)


def test_recall_of_every_allowed_block_is_one_and_matches_numpy():
  t, heads = 128, 4
  q, k, _, _ = inputs(2, 2, t, heads, 2, 32, jnp.float32)
  causal = sja.CausalMask((t, t))
  full = sja.make_layout(causal, num_heads=heads, block_q=16, block_kv=16)
  ones = jax.jit(lambda q, k: sja.layout_recall(q, k, full, mask=causal))(q, k)
  assert ones.shape == (2, heads) and ones.dtype == jnp.float32
  np.testing.assert_allclose(ones, 1, atol=1e-5)
  recall = jax.jit(sja.layout_recall, static_argnames="mask")
  dense = sja.make_layout(sja.FullMask((t, t)), num_heads=heads, block_q=16, block_kv=32)
  np.testing.assert_allclose(recall(q, k, dense), 1, atol=1e-5)
  local = causal & sja.LocalMask((t, t), (24, 0))
  narrow = sja.make_layout(local, num_heads=heads, block_q=16, block_kv=16)
  want = recall_oracle(q, k, local.to_numpy(), causal.to_numpy())
  np.testing.assert_allclose(recall(q, k, narrow, mask=causal), want, atol=1e-5)
  assert np.all(want < 0.99) and np.all(want > 0.1)
  np.testing.assert_array_less(recall(q, k, narrow), 0.9)  # against full attention


def test_recall_leaves_out_rows_without_keys():
  t, heads = 64, 2
  q, k, _, _ = inputs(3, 1, t, heads, 1, 16, jnp.float32)
  late = sja.CausalMask((t, t), offset=-20)  # rows 0-19 see no key
  mask = sja.MultiHeadMask((late, sja.CausalMask((t, t), offset=-t)))  # head 1 sees nothing
  window = sja.LocalMask((t, t), (30, 0))
  layout = sja.make_layout(window, num_heads=heads, block_q=16, block_kv=16)
  got = np.asarray(jax.jit(lambda q, k: sja.layout_recall(q, k, layout, mask=mask))(q, k))
  want = recall_oracle(q, k, window.to_numpy(), np.stack([m.to_numpy() for m in mask.masks]))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert 0.1 < got[0, 0] < 0.99 and got[0, 1] == 1


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_triton", "pallas_tpu"])
def test_estimated_layout_runs_in_every_implementation(implementation):
  block = 128 if implementation == "pallas_tpu" else 16
  t, heads = 4 * block, 4
  q, k, v, _ = inputs(4, 2, t, heads, 2, 32, jnp.float32)

  @jax.jit
  def attend(q, k, v):
    layout = sja.estimate_vertical_slash(q, k, block_q=block, block_kv=block, k_blocks=2,
                                         num_vertical=8, num_slash=8, last_q=32, causal=True)
    out = sja.block_sparse_attention(q, k, v, layout, implementation=implementation,
                                     interpret=True)
    return out, sja.dense_mask(layout)[layout.head_row]

  out, covered = attend(q, k, v)
  covered = np.asarray(covered)
  causal = np.tri(t, dtype=bool)
  assert covered.shape == (2, heads, t, t) and not np.any(covered & ~causal)
  assert np.all(covered.sum((2, 3)) < causal.sum())  # sparse: some causal blocks are left out
  group = np.repeat(np.float64(k), 2, axis=2), np.repeat(np.float64(v), 2, axis=2)
  s = np.einsum("bthd,bshd->bhts", np.float64(q), group[0]) / np.sqrt(32)
  p = np.exp(np.where(covered, s, -np.inf) - s.max(-1, keepdims=True))
  want = np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), group[1])
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("change, match", [
    (dict(k_blocks=9), "k_blocks=9 must be <= 8"),
    (dict(k_blocks=0), "k_blocks=0 must be an integer >= 1"),
    (dict(num_vertical=129), "num_vertical=129 must be <= 128"),
    (dict(num_slash=-1), "num_slash=-1 must be an integer >= 0"),
    (dict(last_q=256), "last_q=256 must be <= 128"),
    (dict(last_q=2.0), "last_q=2.0 must be an integer"),
    (dict(block_q=24, block_kv=24), "must be multiples of block_q=24"),
    (dict(block_kv=32), "causal=True needs block_q == block_kv"),
    (dict(sm_scale=jnp.ones(())), "sm_scale must be a Python float"),
])
def test_estimate_rejects_bad_arguments(change, match):
  q, k, _, _ = inputs(5, 1, 128, 4, 2, 16, jnp.float32)
  kwargs = dict(block_q=16, block_kv=16, k_blocks=2, num_vertical=4, num_slash=4,
                causal=True) | change
  with pytest.raises(ValueError, match=match):
    sja.estimate_vertical_slash(q, k, **kwargs)


def test_recall_rejects_bad_arguments():
  q, k, _, _ = inputs(6, 1, 64, 2, 1, 16, jnp.float32)
  layout = sja.make_layout(sja.CausalMask((64, 64)), num_heads=2, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match="layout must be a sja.Layout"):
    sja.layout_recall(q, k, sja.CausalMask((64, 64)))
  with pytest.raises(ValueError, match="layout is for q_len=64, kv_len=64, heads=2"):
    sja.layout_recall(q[:, :32], k, layout)
  with pytest.raises(ValueError, match=r"mask.shape=\(32, 32\) must be \(q_len, kv_len\)"):
    sja.layout_recall(q, k, layout, mask=sja.CausalMask((32, 32)))
  with pytest.raises(ValueError, match="q and k must be 4-D arrays"):
    sja.layout_recall(q[0], k, layout)
  with pytest.raises(ValueError, match="kv_heads dividing the 2 query heads"):
    sja.estimate_vertical_slash(q, k.repeat(3, 2), block_q=16, block_kv=16, k_blocks=2,
                                num_vertical=4, num_slash=4, causal=True)
