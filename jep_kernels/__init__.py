"""jep_kernels: jep's compiled and kernel-level code, each kernel with a reference beside it.

`jep` imports this package, never the other way round.
  ragged_a2a/      the ragged all-to-all as an XLA FFI custom call (C++ for the CPU, CUDA), behind
                   `jep.transport` as backend "ffi".
  grouped_matmul/  the grouped GEMM in Pallas Mosaic GPU (Hopper): forward, dx and dw, behind
                   `jep.expert_ffn` as backend "pallas" ("auto" on Hopper).
  permute/         token-row gathers and weighted sums in Pallas Mosaic GPU (Hopper), behind
                   `jep.dispatch` / `jep.combine` as permute="pallas" ("auto" where faster).
"""
