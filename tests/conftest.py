"""Test configuration: CPU only, rank promotion errors, a quicker CPU compiler."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling many small programs. LLVM's
# optimisation level 0 compiles the same HLO (XLA's own passes, fusion
# included, still run) about a third faster; results are equal within float
# tolerance and every test compares within one configuration. Examples run
# from the tests inherit it; benchmarks and user runs keep the default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
