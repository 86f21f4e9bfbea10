"""Decode attention as Pallas kernels (GPU Triton and TPU Mosaic): being written."""


def decode(q, k_pool, v_pool, phys, logical, head, lengths, *, mask, sm_scale, num_splits,
           backend, interpret):
  raise NotImplementedError("being written")
