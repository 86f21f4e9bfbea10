"""Activation sparsity: activations trained to be sparse, or thresholded after training.

Trained: `topk` (Q-Sparse), `relu2`, ProSparse's `l1_penalty` with its
`prosparse_schedule`, and `sparsity` to measure what a model reaches.
Training-free: `teal`, `chess` and `wina` turn a calibration
(``sj.calibrate(..., histogram=True)``) into per-channel input thresholds,
paired with the params, and `allocate` spreads a mean sparsity over layers
(TEAL's greedy allocation); ``sj.nn.sparsify_inputs`` applies them to a model's
Linear layers, which then multiply with ``sj.matmul.sparse_input_matmul``.

Example:
  >>> h = sj.activations.topk(x @ w_up, 0.25)          # Q-Sparse, straight-through
  >>> h = sj.activations.relu2(x @ w_up)               # ReLU²
  >>> strength = sj.activations.prosparse_schedule(1e-3, warmup_steps=100, stage_steps=50)
  >>> loss = task + sj.activations.l1_penalty(h, strength, step)   # ProSparse
  >>> sj.activations.sparsity({"ffn": h})
  >>> calibration = sj.calibrate(model, batches, histogram=True, gram=False)
  >>> thresholds = sj.activations.teal(calibration, sparsity=0.4)  # or chess, wina
  >>> sparsities = sj.activations.allocate(model, calibration, sparsity=0.4)  # TEAL's greedy
  >>> sj.nn.sparsify_inputs(model, thresholds)
"""

from sparsejax._src.activations.training_free import allocate as allocate
from sparsejax._src.activations.training_free import chess as chess
from sparsejax._src.activations.training_free import input_sparsity as input_sparsity
from sparsejax._src.activations.training_free import teal as teal
from sparsejax._src.activations.training_free import wina as wina
from sparsejax._src.activations.trained import l1_penalty as l1_penalty
from sparsejax._src.activations.trained import prosparse_schedule as prosparse_schedule
from sparsejax._src.activations.trained import relu2 as relu2
from sparsejax._src.activations.trained import sparsity as sparsity
from sparsejax._src.activations.trained import topk as topk

__all__ = ("allocate", "chess", "input_sparsity", "l1_penalty", "prosparse_schedule", "relu2", "sparsity",
           "teal", "topk", "wina")
