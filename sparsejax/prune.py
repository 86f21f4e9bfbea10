"""Post-training pruning of trained models: Wanda, SparseGPT, DSnoT, OWL.

Calibrate once with `sj.calibrate`, prune with any rule, and recover with
``sj.sparsify(optax.adamw(1e-4), sj.fixed(masks))``. Every rule takes the
calibrated model (or its params) and the calibration, and returns masks
paired with the params (SparseGPT also returns updated params).

Example:
  >>> calibration = sj.calibrate(model, batches)
  >>> masks, params = sj.prune.sparsegpt(model, calibration, sparsity=0.5)
  >>> masks = sj.prune.dsnot(params, calibration, sj.prune.wanda(model, calibration, pattern=(2, 4)), pattern=(2, 4))
"""

from sparsejax._src.prune.dsnot import dsnot as dsnot
from sparsejax._src.prune.owl import overrides as overrides
from sparsejax._src.prune.owl import owl as owl
from sparsejax._src.prune.sparsegpt import sparsegpt as sparsegpt
from sparsejax._src.prune.wanda import magnitude as magnitude
from sparsejax._src.prune.wanda import wanda as wanda

__all__ = ("dsnot", "magnitude", "overrides", "owl", "sparsegpt", "wanda")
