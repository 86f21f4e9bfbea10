"""Decode attention as Pallas kernels: the entry `decode_attention` calls for "pallas_*".

Two kernels over the same page lists (`decode_pallas_pages`): Triton on GPU
(`decode_pallas_gpu`: a program per (sequence, KV head, split) loops over
its pages) and Mosaic on TPU (`decode_pallas_tpu`: the pages are a grid
axis driven by prefetched scalars). Both group the query heads of a KV head
in one tile (GQA/MQA), split the pages to read (flash-decoding) and merge
the splits by their log-sum-exps (`decode.combine`). Masks must be
computable in a kernel (structured masks and their ``&``/``|``); table
masks raise a ValueError. Inference only: no VJP.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparsejax._src.attention import decode_pallas_gpu
from sparsejax._src.attention import decode_pallas_tpu

_BACKENDS = {"triton": decode_pallas_gpu, "tpu": decode_pallas_tpu}


def decode(q, k_pool, v_pool, phys, logical, head, lengths, *, mask, sm_scale, num_splits,
           backend, interpret):
  """Decode attention over decode's page view (`decode.paged_view`) with a Pallas kernel.

  Args:
    q: [batch, q_tokens, heads, head_dim]
    k_pool, v_pool: [num_pages, page_size, pool_heads, head_dim]
    phys, logical: int32[batch, kv_heads, n]: pool pages and their page
      numbers in the sequence, -1 where absent.
    head: int32[kv_heads]: each KV head's index in the pool's head axis.
    lengths: int32[batch]
    mask: a `Mask`, a `MultiHeadMask` or None.
    sm_scale: softmax scale.
    num_splits: split-KV partitions per (sequence, KV head), or None for the
      kernel's default (Triton: enough programs to fill a GPU; TPU: one).
    backend: "triton" or "tpu".
    interpret: run the kernel in the Pallas interpreter.

  Returns:
    (out float32[batch, q_tokens, heads, head_dim], lse float32[batch, heads, q_tokens]).

  Raises:
    ValueError: for pages or heads the kernel cannot tile, and table masks.
  """
  kernel = _BACKENDS[backend]
  batch, q_tokens, heads = q.shape[:3]
  if batch == 0 or phys.shape[2] == 0:  # no program to launch
    return (jnp.zeros(q.shape, jnp.float32),
            jnp.full((batch, heads, q_tokens), -jnp.inf, jnp.float32))
  return kernel.decode(q, k_pool, v_pool, phys, logical, head, lengths, mask=mask,
                       sm_scale=sm_scale, num_splits=num_splits,
                       block_sizes=kernel.BlockSizes.get_default(), interpret=interpret)
