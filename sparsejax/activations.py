"""Activation sparsity: activations trained to be sparse, and how sparse they are.

Example:
  >>> h = sj.activations.topk(x @ w_up, 0.25)          # Q-Sparse, straight-through
  >>> h = sj.activations.relu2(x @ w_up)               # ReLU²
  >>> strength = sj.activations.prosparse_schedule(1e-3, warmup_steps=100, stage_steps=50)
  >>> loss = task + sj.activations.l1_penalty(h, strength, step)   # ProSparse
  >>> sj.activations.sparsity({"ffn": h})
"""

from sparsejax._src.activations.trained import l1_penalty as l1_penalty
from sparsejax._src.activations.trained import prosparse_schedule as prosparse_schedule
from sparsejax._src.activations.trained import relu2 as relu2
from sparsejax._src.activations.trained import sparsity as sparsity
from sparsejax._src.activations.trained import topk as topk

__all__ = ("l1_penalty", "prosparse_schedule", "relu2", "sparsity", "topk")
