"""jep_kernels: jep's compiled and kernel-level code, each kernel with a reference beside it.

`jep` imports this package, never the other way round. Its kernels (the Pallas grouped GEMM and
token permutes, the ragged all-to-all FFI custom call) arrive behind the registries that
`jep.expert_ffn` and `jep.transport` already have; until then it holds no kernel.
"""
