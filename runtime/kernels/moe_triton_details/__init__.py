"""The MoE kernels behind runtime/kernels/moe_triton.py (its host API), one module per piece, as
triton_kernels splits matmul_ogs:

- ptx.py: the inline-PTX builders (the MXFP4 decodes, the tensor-core GEMVs' mma.sync steps and results)
- common.py: what every kernel shares (its tile, its x rows, the SwiGLU epilogue)
- gemm.py: the wgmma GEMM ("gemm" tiles)
- gemv.py: the GEMV ("gemv" tiles) and its CUDA-core routes
- gemv_tensor_core.py: the GEMV's two mma.sync routes ("tensor_core_row", "tensor_core_rows")
- routing.py: the rows sorted by expert (plan, count_sort)
- combine.py: the weighted combine + residual (+ the next RMSNorm)
- tiles.py: the Tiles, the table that chooses them, the shapes each route supports
"""
