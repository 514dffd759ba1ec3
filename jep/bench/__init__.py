"""`python -m jep.bench transport|gemm|permute|layer|routing|all`: jep against its peers, side by
side, in one run.

Each suite times its variants with loops inside one jit (inputs rotated, warm-up first, the median
of several repeats), prints a table, and writes JSON (every figure, with device, versions and date)
and PNG plots under `--out`. Bytes are counted as DeepEP counts them: the bf16 bytes of the token
rows a rank receives.
"""
