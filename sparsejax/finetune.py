"""Sparse fine-tuning: trainable sparse deltas over a frozen model, and merging them.

A delta is a fixed budget of (index, value) entries per leaf, trained by any
optax optimizer whose state covers those entries only; a selector chooses
the entries (SpIEL moves them while training; LT-SFT, S2FT and `fixed` keep
them). Merging adds deltas to the base; over a pruned base
(``sparse_base=True``) pruned entries stay exactly zero.

Example (see `sparse_delta` for a training step):
  >>> tx = sj.finetune.sparse_delta(optax.adamw(1e-3), sj.finetune.lt_sft(
  ...     0.03, finetuned=tuned))
  >>> both = sj.finetune.merge(base, delta_a, delta_b, weights=(0.5, 0.5))
"""

from sparsejax._src.finetune.delta import Selector as Selector
from sparsejax._src.finetune.delta import SparseDelta as SparseDelta
from sparsejax._src.finetune.delta import SparseDeltaState as SparseDeltaState
from sparsejax._src.finetune.delta import get_delta as get_delta
from sparsejax._src.finetune.delta import merge as merge
from sparsejax._src.finetune.delta import sparse_delta as sparse_delta
from sparsejax._src.finetune.delta import state_bytes as state_bytes
from sparsejax._src.finetune.fixed import fixed as fixed
from sparsejax._src.finetune.fixed import lt_sft as lt_sft
from sparsejax._src.finetune.fixed import s2ft as s2ft
from sparsejax._src.finetune.spiel import spiel as spiel

__all__ = ("Selector", "SparseDelta", "SparseDeltaState", "fixed", "get_delta", "lt_sft",
           "merge", "s2ft", "sparse_delta", "spiel", "state_bytes")
