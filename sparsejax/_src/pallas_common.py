"""Constants shared by the Pallas kernels (attention and matmul, GPU and TPU)."""

# `lax.dot_general` dimension numbers for 2-d operands.
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
