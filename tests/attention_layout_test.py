"""Closed-form block classification equals brute force; layout sparsity and pictures."""

import itertools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention as sja
from sparsejax._src.attention import layout as layout_lib

SHAPES = [(64, 64), (48, 96), (96, 48)]
BLOCKS = [(8, 8), (16, 8), (8, 16), (16, 16), (4, 12), (3, 16)]


def _leaves(shape):
  """Every structured mask, with offsets of both signs and windows that straddle blocks."""
  q_len, kv_len = shape
  return {
      "full": sja.FullMask(shape),
      "causal": sja.CausalMask(shape),
      "causal_minus": sja.CausalMask(shape, offset=-5),
      "causal_plus": sja.CausalMask(shape, offset=kv_len - q_len + 9),
      "causal_empty": sja.CausalMask(shape, offset=-q_len),
      "local": sja.LocalMask(shape, (5, 2)),
      "local_left": sja.LocalMask(shape, (None, 0), offset=3),
      "local_right": sja.LocalMask(shape, (0, None), offset=-7),
      "local_wide": sja.LocalMask(shape, (20, 11), offset=-13),
      "chunked": sja.ChunkedCausalMask(shape, chunk=12),
      "chunked_one": sja.ChunkedCausalMask(shape, chunk=1),
      "a_shape": sja.AShapeMask(shape, sink=4, window=8),
      "a_shape_no_sink": sja.AShapeMask(shape, sink=0, window=3),
      "shard": sja.StridedShardMask(shape, block=8, num_shards=4, shard=1, local_window=6),
      "shard_misaligned": sja.StridedShardMask(shape, block=5, num_shards=3, shard=2,
                                               causal=False),
      "bigbird": sja.BigBirdMask(shape, block=8, num_global=1, window=1, num_random=2, seed=3),
      "bigbird_causal": sja.BigBirdMask(shape, block=6, num_global=2, window=0, num_random=1,
                                        seed=1, causal=True),
      "vertical_slash": sja.VerticalSlashMask(shape, vertical=(0, 5, 40), slash=(0, 1, 17, 30)),
  }


class _Stripes(sja.Mask):
  """A user mask with only an element rule: block tables come from element evaluation."""

  def __init__(self, shape):
    self.shape = shape

  def _eval(self, q, kv, xp):
    return (q + 2 * kv) % 5 < 2


class _StrictlyCausal(sja.CausalMask):
  """A structured mask with a new element rule: its inherited closed form must not be used."""

  def _eval(self, q, kv, xp):
    return kv < q


def _brute(mask, block_q, block_kv):
  q_len, kv_len = mask.shape
  tiles = mask.to_numpy().reshape(q_len // block_q, block_q, kv_len // block_kv, block_kv)
  return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


def _assert_tables(mask, blocks=BLOCKS):
  for block_q, block_kv in blocks:
    if mask.shape[0] % block_q or mask.shape[1] % block_kv:
      continue
    any_, all_ = mask.block_any_all(block_q, block_kv)
    want_any, want_all = _brute(mask, block_q, block_kv)
    np.testing.assert_array_equal(any_, want_any, err_msg=f"any {mask} {block_q}x{block_kv}")
    np.testing.assert_array_equal(all_, want_all, err_msg=f"all {mask} {block_q}x{block_kv}")


def _assert_same_layout(mask, block_q, block_kv):
  """The closed-form layout equals the element-evaluated one, array for array."""
  layout = sja.make_layout(mask, num_heads=1, block_q=block_q, block_kv=block_kv)
  reference = sja.make_layout(sja.NumpyMask(mask.to_numpy()), num_heads=1, block_q=block_q,
                              block_kv=block_kv)
  assert layout.masks in (None, (mask,)) and reference.masks is None  # test_kernel_masks
  for name in sja.Layout._fields[:-1]:
    got, want = getattr(layout, name), getattr(reference, name)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_mask_equals_brute_force(shape):
  for name, mask in _leaves(shape).items():
    assert mask._closed_form, name  # pylint: disable=protected-access
    _assert_tables(mask)
    _assert_same_layout(mask, 8, 16)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_pair_and_or_equals_brute_force(shape):
  leaves = _leaves(shape)
  for a, b in itertools.combinations(sorted(leaves), 2):
    _assert_tables(leaves[a] & leaves[b], BLOCKS[:4])
    _assert_tables(leaves[a] | leaves[b], BLOCKS[:4])


@pytest.mark.parametrize("shape", SHAPES)
def test_nested_combinations_equal_brute_force(shape):
  m = _leaves(shape)
  nested = [
      m["causal"] & (m["local"] | m["a_shape"]) | (m["chunked"] & m["causal_minus"]),
      (m["local_wide"] & m["causal_plus"]) & (m["local_left"] & m["chunked"]),  # all intervals
      (m["shard"] | m["bigbird"]) & (m["vertical_slash"] | m["local_right"]),
      ((m["causal"] | m["local_right"]) & m["local_wide"]) | m["bigbird_causal"],
      sja.NumpyMask(np.random.default_rng(0).random(shape) < 0.7) & m["causal"] | m["local"],
      (_Stripes(shape) | m["chunked"]) & m["a_shape"],
      _StrictlyCausal(shape) & m["local"],
  ]
  for mask in nested:
    _assert_tables(mask)
    _assert_same_layout(mask, 16, 8)


def test_combinations_decide_what_their_children_leave_open():
  shape = (64, 64)
  before = sja.CausalMask(shape, offset=-10)  # keys j <= i - 10
  after = sja.LocalMask(shape, (2, None))  # keys j >= i - 2: no key is in both
  for a in [before, before | before]:  # an interval, and a union decided block by block
    a_any, a_all = a.block_any_all(16, 16)
    assert (a_any & ~a_all).any()  # partial blocks that share no entry with `after`
    assert not (a & after).block_any_all(16, 16)[0].any()
  complement = sja.LocalMask(shape, (0, None), offset=1)  # keys j >= i + 1
  any_, all_ = (sja.CausalMask(shape) | complement).block_any_all(16, 16)
  assert all_.all()


@st.composite
def _mask_trees(draw):
  block_q, block_kv = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4, 8]))
  shape = (block_q * draw(st.integers(1, 6)), block_kv * draw(st.integers(1, 6)))
  q_len, kv_len = shape
  small = st.integers(0, 12)
  window = st.one_of(st.none(), small)
  leaf = st.one_of(
      st.just(sja.FullMask(shape)),
      st.builds(sja.CausalMask, st.just(shape), st.integers(-20, 20)),
      st.builds(sja.LocalMask, st.just(shape), st.tuples(window, window), st.integers(-20, 20)),
      st.builds(sja.ChunkedCausalMask, st.just(shape), st.integers(1, 20)),
      st.builds(sja.AShapeMask, st.just(shape), small, st.integers(1, 12)),
      st.integers(1, 4).flatmap(lambda n: st.builds(
          sja.StridedShardMask, st.just(shape), st.integers(1, 10), st.just(n),
          st.integers(0, n - 1), small, st.booleans())),
      st.builds(sja.BigBirdMask, st.just(shape), st.integers(1, 10), st.integers(0, 2),
                st.integers(0, 2), st.integers(0, 2), st.integers(0, 99), st.booleans()),
      st.builds(sja.VerticalSlashMask, st.just(shape),
                st.lists(st.integers(0, kv_len - 1), max_size=4).map(tuple),
                st.lists(st.integers(0, q_len + 4), max_size=4).map(tuple)),
  )
  tree = st.recursive(leaf, lambda kids: st.tuples(kids, kids, st.booleans()).map(
      lambda t: t[0] & t[1] if t[2] else t[0] | t[1]), max_leaves=4)
  return draw(tree), block_q, block_kv


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(_mask_trees())
def test_random_mask_trees_equal_brute_force(case):
  mask, block_q, block_kv = case
  _assert_tables(mask, [(block_q, block_kv)])
  any_, all_ = mask.block_any_all(block_q, block_kv)
  active, pidx, patterns = layout_lib._mask_blocks(mask, block_q, block_kv)  # pylint: disable=protected-access
  ref_active, ref_pidx, ref_patterns = layout_lib._element_blocks(mask, block_q, block_kv)  # pylint: disable=protected-access
  np.testing.assert_array_equal(active, ref_active)
  np.testing.assert_array_equal(pidx, ref_pidx)
  np.testing.assert_array_equal(np.reshape(patterns, (-1, block_q, block_kv)),
                                np.reshape(ref_patterns, (-1, block_q, block_kv)))
  np.testing.assert_array_equal(pidx >= 0, any_ & ~all_)


def test_kernel_masks_are_the_traced_masks():
  """Which layouts carry their masks, and that traced evaluation (the kernels') is NumPy's."""
  leaves = _leaves((64, 64))
  tables = {"bigbird", "bigbird_causal", "vertical_slash"}
  for name, mask in leaves.items():
    layout = sja.make_layout(mask, num_heads=2, block_q=16, block_kv=16)
    assert layout.masks == (None if name in tables else (mask,)), name
    if name not in tables:  # at positions of both signs: floor division without jnp's sign op
      pos = np.arange(-40, 64, dtype=np.int32)
      traced = jax.jit(mask.__call__)(jnp.asarray(pos[:, None]), jnp.asarray(pos[None, :]))
      np.testing.assert_array_equal(traced, mask(pos[:, None], pos[None, :]), err_msg=name)
  blocks = {"block_q": 16, "block_kv": 16}
  assert sja.make_layout(_Stripes((64, 64)), num_heads=1, **blocks).masks is None  # jnp's %
  strict = _StrictlyCausal((64, 64))
  assert sja.make_layout(strict, num_heads=1, **blocks).masks == (strict,)
  heads = sja.MultiHeadMask((leaves["causal"], leaves["shard"], leaves["causal"]))
  assert sja.make_layout(heads, num_heads=3, block_q=16, block_kv=16).masks == (
      leaves["causal"], leaves["shard"])  # a row per distinct mask
  mixed = sja.MultiHeadMask((leaves["causal"], leaves["bigbird"]))
  assert sja.make_layout(mixed, num_heads=2, block_q=16, block_kv=16).masks is None


def test_layout_masks_are_static_pytree_data():
  """Masks are aux data: tree maps keep them, jit specializes on them, segments map their rows."""
  t = 64
  leaves = _leaves((t, t))
  layout = sja.make_layout(sja.MultiHeadMask((leaves["causal"], leaves["shard"])), num_heads=2,
                           block_q=16, block_kv=16)
  assert len(jax.tree.leaves(layout)) == 8
  copy = jax.tree.map(jnp.array, layout)
  assert copy.masks == layout.masks and copy.partial is not layout.partial
  traces = []

  @jax.jit
  def density(lay):
    traces.append(lay.masks)
    return lay.density()

  density(layout), density(copy)
  assert len(traces) == 1  # the same masks: no retrace
  other = sja.make_layout(sja.MultiHeadMask((leaves["causal_minus"], leaves["shard"])),
                          num_heads=2, block_q=16, block_kv=16)
  density(other)
  assert len(traces) == 2 and traces[1] == other.masks
  ids = jnp.asarray(np.repeat(np.arange(4), t // 4)[None].repeat(3, 0), jnp.int32)
  per_batch = sja.segment_layout(layout, ids)  # rows: batch x layout rows
  assert per_batch.masks == layout.masks * 3
  again = sja.segment_layout(per_batch, ids)  # rows per (batch, head), from concrete head_row
  assert again.masks == tuple(per_batch.masks[r] for r in np.asarray(per_batch.head_row).ravel())
  assert jax.jit(lambda lay: sja.segment_layout(lay, ids))(per_batch).masks is None  # traced rows
  assert jax.jit(lambda lay: sja.segment_layout(lay, ids))(layout).masks == layout.masks * 3


def test_block_any_all_bad_blocks():
  with pytest.raises(ValueError, match="block_q=24 must divide the mask's length 64"):
    sja.CausalMask((64, 64)).block_any_all(24, 16)


CAUSAL_PICTURE = """\
head 0: 4 x 4 blocks of 128 x 128, sparsity 37.50%
|░░      |
|██░░    |
|████░░  |
|██████░░|"""


def test_sparsity_and_to_string_on_a_known_layout():
  layout = sja.make_layout(sja.CausalMask((512, 512)), num_heads=1, block_q=128, block_kv=128)
  assert float(layout.sparsity) == 0.375 == 1 - float(layout.density())
  assert layout.to_string() == CAUSAL_PICTURE
  multi = sja.MultiHeadMask([sja.CausalMask((64, 64)), sja.FullMask((64, 64))])
  layout = sja.make_layout(multi, num_heads=2, block_q=8, block_kv=8)
  assert float(layout.sparsity) == pytest.approx((28 / 64 + 0) / 2)
  assert layout.to_string(head=1).splitlines()[1:] == ["|" + "██" * 8 + "|"] * 8
  # 8 x 8 blocks in 4 x 4 cells: a cell is full only if all its blocks are.
  small = layout.to_string(head=0, max_blocks=4).splitlines()
  assert small[0].endswith("(a cell: 2 x 2 blocks)")
  assert small[1:] == CAUSAL_PICTURE.splitlines()[1:]
  with pytest.raises(ValueError, match="head=2 must be < num_heads=2"):
    layout.to_string(head=2)


def test_plot_layout_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  multi = sja.MultiHeadMask([sja.CausalMask((64, 64)), sja.AShapeMask((64, 64), 4, 16)])
  layout = sja.make_layout(multi, num_heads=2, block_q=8, block_kv=8)
  path = sja.plot_layout(layout, tmp_path / "layout.png", heads=[0, 1])
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
