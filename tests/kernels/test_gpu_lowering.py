"""Every Triton kernel lowers to an sm_90 cubin (TTIR -> TTGIR -> LLVM -> PTX -> ptxas), without a GPU.

The interpreter tests check the numerics; this checks what the interpreter cannot: that the kernels are
valid for the real compiler (tl.dot shapes and dtypes, constexpr branches, int64 offsets, atomics) in
the dtype variants the launchers use. Runs in a subprocess without TRITON_INTERPRET, because under the
interpreter ``triton.jit`` returns interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    C = importlib.import_module("t2l_fast.kernels.composite")
    S = importlib.import_module("t2l_fast.kernels.self_similarity")
    A = importlib.import_module("t2l_fast.kernels.atlas_sample")
    target = GPUTarget("cuda", 90, 32)

    def lower(fn, types, consts):
        sig = {n: "constexpr" if n in consts else types.get(n, types["*"]) for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": 4})
        assert k.asm.get("cubin"), fn.__name__

    G = dict(G0=0.0, G1=177 / 255, G2=64 / 255)
    variants = [
        ("*bf16", tl.float32, tl.bfloat16, "ieee"),
        ("*fp32", tl.float32, tl.float32, "tf32"),
        ("*fp64", tl.float64, tl.float64, "ieee"),
    ]
    for pt, acc, dot, prec in variants:
        at = "*fp64" if acc == tl.float64 else "*fp32"
        lower(C._composite_fwd_kernel, {"N": "i32", "NBLK": "i32", "*": pt, "l1_ptr": at, "l0_ptr": at},
              dict(**G, ACC=acc, BLOCK=1024))
        lower(C._composite_bwd_kernel, {"N": "i32", "*": pt, "g1_ptr": "*fp32", "g0_ptr": "*fp32"},
              dict(**G, HAS_GC=True, HAS_GG=True, NEED_DRGBA=True, NEED_DBG=True, ACC=acc, BLOCK=1024))
        ints = {k: "i32" for k in ["P", "HW", "Ha", "Wa"]}
        lower(A._atlas_fwd_kernel, {**ints, "*": pt, "uv_ptr": "*fp32"},
              dict(**G, HAS_OPAC=True, ACC=acc, BLOCK=256))
        lower(A._atlas_bwd_kernel, {**ints, "*": pt, "uv_ptr": "*fp32", "datlas_ptr": at},
              dict(**G, HAS_OPAC=True, HAS_GE=True, HAS_GAL=True, HAS_GC=True, HAS_GG=True, NEED_DATLAS=True,
                   NEED_DOPAC=True, NEED_DFRAMES=True, ACC=acc, BLOCK=256))
        ints = {k: "i32" for k in ["K", "D", "NI", "NJ"]}
        tiles = dict(ACC=acc, DOT=dot, PREC=prec, BM=64, BN=64, BD=64 if pt == "*bf16" else 32)
        lower(S._ssim_fwd_kernel, {**ints, "*": at, "t_ptr": pt, "tgt_ptr": "*fp32"},
              dict(EPS_=1e-8, MSE=True, **tiles))
        lower(S._ssim_bwd_coef_kernel, {**ints, "*": at, "t_ptr": pt, "g_ptr": "*fp32"},
              dict(EPS_=1e-8, MSE=True, NEED_DTGT=True, **tiles))
        lower(S._ssim_bwd_tokens_kernel, {**ints, "*": at, "t_ptr": pt, "dt_ptr": pt},
              dict(ACC=acc, PREC=prec, BM=64, BK=64, BD=64, NJ_P2=4))
    # The plain self_similarity variants (S stored, upstream dL/dS read) in bf16.
    tiles = dict(ACC=tl.float32, DOT=tl.bfloat16, PREC="ieee", BM=32, BN=32, BD=64)
    ints = {"K": "i32", "D": "i32", "NI": "i32", "NJ": "i32", "*": "*fp32", "t_ptr": "*bf16"}
    lower(S._ssim_fwd_kernel, ints, dict(EPS_=1e-8, MSE=False, **tiles))
    lower(S._ssim_bwd_coef_kernel, ints, dict(EPS_=1e-8, MSE=False, NEED_DTGT=False, **tiles))
    print("LOWERED-OK")
    """
)


def test_kernels_lower_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LOWERED-OK" in proc.stdout
