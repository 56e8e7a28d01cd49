"""Self-similarity of ViT tokens, fused with the MSE against a target matrix.

Inputs
    tokens (B, K, D)   CLIP ViT tokens (CLS included), any float dtype
    target (B, K, K)   the source image's self-similarity (no gradient)
Outputs
    self_similarity(tokens)           S (B, K, K), S_ij = <t_i, t_j> / max(|t_i| |t_j|, 1e-8), fp32
    self_similarity_mse(tokens, tgt)  mean((S - tgt)^2), fp32 scalar

Gradient of the MSE (G = 2 (S - tgt) / (B K K) * upstream, symmetric part used twice):
    dL/dt_i = sum_j (G_ij + G_ji) * [t_j / n_ij - S_ij * t_i * |t_j| / (|t_i| * n_ij)]
with n_ij = max(|t_i| |t_j|, 1e-8); where the clamp is active the second term vanishes.

Triton path. Forward: one kernel per (i, j) tile of S computes the Gram tile with ``tl.dot`` and the
two norm vectors from the same loads (no normalised copy of the tokens is ever written), then stores
S (``self_similarity``) or a per-tile partial sum of (S - tgt)^2 (``self_similarity_mse``, reduced on
the host, deterministic). Backward, with P_ij = Gs_ij / n_ij and q_i = sum_j Gs_ij S_ij / |t_i|^2
(unclamped pairs only), dL/dt_i = sum_j P_ij t_j - q_i t_i = ((P - diag q) @ T)_i:
kernel 1 recomputes each S tile and writes P (B, K, K) and per-tile row sums of q; kernel 2 computes
P @ T per (row block, D chunk) and subtracts q_i t_i. Arithmetic and accumulation in fp32 (fp64 for
fp64 tokens, which gradcheck uses, and the results are then fp64); ``tl.dot`` takes bf16/fp16 tokens
as they are (exact products, fp32 accumulation), and fp32 operands in IEEE fp32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set, as for torch's own ``bmm``.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._triton import FLOAT_DTYPES, acc_dtype, jit, next_pow2, on_interpreter, tl, triton

EPS = 1e-8


def _check(tokens: torch.Tensor, target: torch.Tensor | None = None) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, K, D), got {tuple(tokens.shape)}")
    if target is not None:
        b, k, _ = tokens.shape
        if tuple(target.shape) != (b, k, k):
            raise ValueError(f"target must be {(b, k, k)}, got {tuple(target.shape)}")


def self_similarity_reference(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix (B, K, K) in fp32: plain torch, the specification."""
    _check(tokens)
    t = tokens.float()
    norms = t.norm(dim=-1)  # (B, K)
    denom = (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(EPS)
    return torch.bmm(t, t.transpose(1, 2)) / denom


def self_similarity_mse_reference(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((S(tokens) - target)^2): plain torch, the specification."""
    _check(tokens, target)
    return (self_similarity_reference(tokens) - target.float()).pow(2).mean()


# ---------------------------------------------------------------------------------------------------
# Triton kernels. tokens (B, K, D) contiguous; program (i-block, j-block, batch).


@jit
def _gram_tile(
    t_ptr,
    ri,
    rj,
    mi,
    mj,
    D,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Gram tile <t_i, t_j> (BM, BN) and the norms |t_i| (BM,), |t_j| (BN,), from one pass over D."""
    gram = tl.zeros((BM, BN), dtype=ACC)
    ssi = tl.zeros((BM,), dtype=ACC)
    ssj = tl.zeros((BN,), dtype=ACC)
    rd = tl.arange(0, BD)
    for d0 in range(0, D, BD):
        md = (d0 + rd) < D
        a = tl.load(t_ptr + ri[:, None] * D + (d0 + rd)[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        c = tl.load(t_ptr + rj[:, None] * D + (d0 + rd)[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        a32 = a.to(ACC)
        c32 = c.to(ACC)
        ssi += tl.sum(a32 * a32, axis=1)
        ssj += tl.sum(c32 * c32, axis=1)
        gram += tl.dot(a.to(DOT), tl.trans(c.to(DOT)), input_precision=PREC, out_dtype=ACC)
    return gram, tl.sqrt(ssi), tl.sqrt(ssj)


@jit
def _ssim_fwd_kernel(
    t_ptr,  # (B, K, D)
    tgt_ptr,  # (B, K, K) target (read if MSE)
    s_ptr,  # (B, K, K) out S (written if not MSE)
    part_ptr,  # (B, NI, NJ) out: partial sums of (S - tgt)^2 (written if MSE)
    K,
    D,
    NI,
    NJ,
    EPS_: tl.constexpr,
    MSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: B*K*D may exceed 2**31
    ri = pid_i * BM + tl.arange(0, BM)
    rj = pid_j * BN + tl.arange(0, BN)
    mi = ri < K
    mj = rj < K
    gram, ni, nj = _gram_tile(t_ptr + b * K * D, ri, rj, mi, mj, D, ACC, DOT, PREC, BM, BN, BD)
    s = gram / tl.maximum(ni[:, None] * nj[None, :], EPS_)
    m2 = mi[:, None] & mj[None, :]
    offs = b * K * K + ri[:, None] * K + rj[None, :]
    if MSE:
        tgt = tl.load(tgt_ptr + offs, mask=m2, other=0.0).to(ACC)
        diff = tl.where(m2, s - tgt, 0.0)
        tl.store(part_ptr + (b * NI + pid_i) * NJ + pid_j, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    else:
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=m2)


@jit
def _ssim_bwd_coef_kernel(
    t_ptr,  # (B, K, D)
    g_ptr,  # MSE: (B, K, K) target and scale_ptr holds 2*upstream/(B*K*K); else (B, K, K) dL/dS
    scale_ptr,  # (1,) (read if MSE)
    p_ptr,  # (B, K, K) out: P = Gs / n
    q_ptr,  # (B, K, NJ) out: per-tile row sums of Gs * S / |t_i|^2 over unclamped pairs
    dtgt_ptr,  # (B, K, K) out: dL/dtarget (written if NEED_DTGT)
    K,
    D,
    NJ,
    EPS_: tl.constexpr,
    MSE: tl.constexpr,
    NEED_DTGT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = pid_i * BM + tl.arange(0, BM)
    rj = pid_j * BN + tl.arange(0, BN)
    mi = ri < K
    mj = rj < K
    m2 = mi[:, None] & mj[None, :]
    gram, ni, nj = _gram_tile(t_ptr + b * K * D, ri, rj, mi, mj, D, ACC, DOT, PREC, BM, BN, BD)
    prod = ni[:, None] * nj[None, :]
    clamped = prod < EPS_  # clamp_min passes the gradient where prod >= eps
    n = tl.where(clamped, EPS_, prod)
    s = gram / n
    offs = b * K * K + ri[:, None] * K + rj[None, :]
    offs_t = b * K * K + rj[None, :] * K + ri[:, None]  # the transposed entry (j, i)
    if MSE:
        scale = tl.load(scale_ptr).to(ACC)
        tgt = tl.load(g_ptr + offs, mask=m2, other=0.0).to(ACC)
        tgt_t = tl.load(g_ptr + offs_t, mask=m2, other=0.0).to(ACC)
        # G_ij + G_ji with G = scale * (S - tgt) and S symmetric.
        gs = scale * (2.0 * s - tgt - tgt_t)
        if NEED_DTGT:
            tl.store(dtgt_ptr + offs, (scale * (tgt - s)).to(dtgt_ptr.dtype.element_ty), mask=m2)
    else:
        gs = tl.load(g_ptr + offs, mask=m2, other=0.0).to(ACC) + tl.load(
            g_ptr + offs_t, mask=m2, other=0.0
        ).to(ACC)
    gs = tl.where(m2, gs, 0.0)
    tl.store(p_ptr + offs, (gs / n).to(p_ptr.dtype.element_ty), mask=m2)
    # Unclamped: n = |t_i||t_j| > 0, so Gs S |t_j| / (|t_i| n) = Gs S / |t_i|^2; clamped pairs add nothing.
    ni2 = tl.where(clamped, 1.0, (ni * ni)[:, None] + tl.zeros_like(prod))
    q = tl.where(clamped, 0.0, gs * s / ni2)
    tl.store(q_ptr + (b * K + ri) * NJ + pid_j, tl.sum(q, axis=1).to(q_ptr.dtype.element_ty), mask=mi)


@jit
def _ssim_bwd_tokens_kernel(
    t_ptr,  # (B, K, D)
    p_ptr,  # (B, K, K)
    q_ptr,  # (B, K, NJ)
    dt_ptr,  # (B, K, D) out
    K,
    D,
    NJ,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    NJ_P2: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = pid_i * BM + tl.arange(0, BM)
    rd = pid_d * BD + tl.arange(0, BD)
    rk = tl.arange(0, BK)
    mi = ri < K
    md = rd < D
    t_base = t_ptr + b * K * D
    p_base = p_ptr + b * K * K
    acc = tl.zeros((BM, BD), dtype=ACC)
    for k0 in range(0, K, BK):
        mk = (k0 + rk) < K
        p = tl.load(p_base + ri[:, None] * K + (k0 + rk)[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        t = tl.load(t_base + (k0 + rk)[:, None] * D + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0)
        acc += tl.dot(p.to(ACC), t.to(ACC), input_precision=PREC, out_dtype=ACC)
    rq = tl.arange(0, NJ_P2)
    q = tl.load(
        q_ptr + (b * K + ri)[:, None] * NJ + rq[None, :], mask=mi[:, None] & (rq < NJ)[None, :], other=0.0
    )
    q = tl.sum(q.to(ACC), axis=1)
    m2 = mi[:, None] & md[None, :]
    ti = tl.load(t_base + ri[:, None] * D + rd[None, :], mask=m2, other=0.0).to(ACC)
    tl.store(
        dt_ptr + b * K * D + ri[:, None] * D + rd[None, :],
        (acc - q[:, None] * ti).to(dt_ptr.dtype.element_ty),
        mask=m2,
    )


# ---------------------------------------------------------------------------------------------------
# Launchers


def _config(tokens: torch.Tensor) -> dict:
    """Tile sizes: ``tl.dot`` needs every dimension >= 16; big tiles under the interpreter (its cost is
    per program), 32/64-wide tiles on GPU depending on how many tiles the batch already provides."""
    b, k, d = tokens.shape
    if b > 65535:
        raise ValueError(f"self_similarity: batch {b} exceeds the grid limit 65535")
    interp = on_interpreter(tokens)
    if interp:
        bm = max(16, min(next_pow2(k), 128))
        bd = max(16, min(next_pow2(d), 256))
        warps = 4
    else:
        bm = 64 if b * triton.cdiv(k, 64) ** 2 >= 264 else 32
        bm = max(16, min(bm, next_pow2(k)))
        bd = 64 if tokens.dtype in (torch.float16, torch.bfloat16) else 32
        warps = 4
    acc = acc_dtype(tokens.dtype)
    if tokens.dtype == torch.float64:
        prec = "ieee"
    else:
        prec = "tf32" if (not interp and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    # The interpreter cannot tl.dot bf16/fp16 operands: upcast there; on GPU keep them (tensor cores).
    half = tokens.dtype in (torch.float16, torch.bfloat16)
    dot = (tl.bfloat16 if tokens.dtype == torch.bfloat16 else tl.float16) if (half and not interp) else acc
    return dict(BM=bm, BN=bm, BD=bd, ACC=acc, DOT=dot, PREC=prec, num_warps=warps)


def _out_dtype(tokens: torch.Tensor) -> torch.dtype:
    return torch.float64 if tokens.dtype == torch.float64 else torch.float32


def _ssim_forward(tokens: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    b, k, d = tokens.shape
    cfg = _config(tokens)
    ni = nj = triton.cdiv(k, cfg["BM"])
    grid = (ni, nj, b)
    out_dtype = _out_dtype(tokens)
    if target is None:
        s = torch.empty((b, k, k), dtype=out_dtype, device=tokens.device)
        _ssim_fwd_kernel[grid](tokens, s, s, s, k, d, ni, nj, EPS_=EPS, MSE=False, **cfg)
        return s
    part = torch.empty((b, ni, nj), dtype=out_dtype, device=tokens.device)
    _ssim_fwd_kernel[grid](tokens, target, part, part, k, d, ni, nj, EPS_=EPS, MSE=True, **cfg)
    return part.sum() / (b * k * k)


def _ssim_backward(
    tokens: torch.Tensor, g: torch.Tensor, scale: torch.Tensor | None, need_dtgt: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g: dL/dS (scale None) or the target (scale = 2 * upstream / (B K K)). Returns (dtokens, dtarget)."""
    b, k, d = tokens.shape
    cfg = _config(tokens)
    nblk = triton.cdiv(k, cfg["BM"])
    acc_t = _out_dtype(tokens)
    p = torch.empty((b, k, k), dtype=acc_t, device=tokens.device)
    q = torch.empty((b, k, nblk), dtype=acc_t, device=tokens.device)
    dtgt = torch.empty_like(g) if need_dtgt else None
    _ssim_bwd_coef_kernel[(nblk, nblk, b)](
        tokens, g, p if scale is None else scale, p, q, p if dtgt is None else dtgt, k, d, nblk,
        EPS_=EPS, MSE=scale is not None, NEED_DTGT=need_dtgt, **cfg,
    )  # fmt: skip
    dt = torch.empty_like(tokens)
    bd = cfg["BD"] if on_interpreter(tokens) else 64
    _ssim_bwd_tokens_kernel[(nblk, triton.cdiv(d, bd), b)](
        tokens, p, q, dt, k, d, nblk, ACC=cfg["ACC"], PREC=cfg["PREC"], BM=cfg["BM"],
        BK=cfg["BN"], BD=bd, NJ_P2=max(next_pow2(nblk), 2), num_warps=cfg["num_warps"],
    )  # fmt: skip
    return dt, dtgt


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (no graph break), with fake (shape) and autograd
# implementations. An unneeded dtarget comes back as an empty tensor (custom ops return no None).


@torch.library.custom_op("t2l_fast::self_similarity", mutates_args=(), schema="(Tensor tokens) -> Tensor")
def _ssim_op(tokens: torch.Tensor) -> torch.Tensor:
    return _ssim_forward(tokens.contiguous(), None)


@_ssim_op.register_fake
def _ssim_fake(tokens):
    b, k, _ = tokens.shape
    return tokens.new_empty((b, k, k), dtype=_out_dtype(tokens))


@torch.library.custom_op(
    "t2l_fast::self_similarity_mse", mutates_args=(), schema="(Tensor tokens, Tensor target) -> Tensor"
)
def _ssim_mse_op(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _ssim_forward(tokens.contiguous(), target.contiguous())


@_ssim_mse_op.register_fake
def _ssim_mse_fake(tokens, target):
    return tokens.new_empty((), dtype=_out_dtype(tokens))


@torch.library.custom_op(
    "t2l_fast::self_similarity_backward",
    mutates_args=(),
    schema="(Tensor tokens, Tensor g, Tensor? scale, bool need_dtgt) -> (Tensor, Tensor)",
)
def _ssim_bwd_op(tokens, g, scale, need_dtgt):
    dt, dtgt = _ssim_backward(tokens.contiguous(), g.contiguous(), scale, need_dtgt)
    return dt, (g.new_empty(0) if dtgt is None else dtgt)


@_ssim_bwd_op.register_fake
def _ssim_bwd_fake(tokens, g, scale, need_dtgt):
    dt = torch.empty_like(tokens, memory_format=torch.contiguous_format)
    return dt, (torch.empty_like(g, memory_format=torch.contiguous_format) if need_dtgt else g.new_empty(0))


def _ssim_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _ssim_autograd(ctx, g_s):
    (tokens,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    dt, _ = _ssim_bwd_op(tokens, g_s, None, False)
    return dt


_ssim_op.register_autograd(_ssim_autograd, setup_context=_ssim_setup)


def _ssim_mse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _ssim_mse_autograd(ctx, g):
    tokens, target = ctx.saved_tensors
    need_t, need_tgt = ctx.needs_input_grad[:2]
    if not (need_t or need_tgt):
        return None, None
    b, k, _ = tokens.shape
    # A device tensor, not a Python float: no host synchronisation in backward.
    scale = (g.to(_out_dtype(tokens)) * (2.0 / (b * k * k))).reshape(1)
    dt, dtgt = _ssim_bwd_op(tokens, target, scale, need_tgt)
    return (dt if need_t else None), (dtgt if need_tgt else None)


_ssim_mse_op.register_autograd(_ssim_mse_autograd, setup_context=_ssim_mse_setup)


def self_similarity_triton(tokens: torch.Tensor) -> torch.Tensor:
    """The Triton path of :func:`self_similarity`, without dispatch (tests, benchmarks)."""
    _check(tokens)
    return _ssim_op(tokens)


def self_similarity_mse_triton(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Triton path of :func:`self_similarity_mse`, without dispatch (tests, benchmarks)."""
    _check(tokens, target)
    return _ssim_mse_op(tokens, target)


def _triton_ok(*tensors: torch.Tensor) -> bool:
    return use_triton(*tensors) and tensors[0].numel() > 0 and all(t.dtype in FLOAT_DTYPES for t in tensors)


def self_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity (B, K, K) in fp32 of tokens (B, K, D); see the module docstring."""
    _check(tokens)
    if _triton_ok(tokens):
        return self_similarity_triton(tokens)
    return self_similarity_reference(tokens)


def self_similarity_mse(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structure loss: MSE between the self-similarity of tokens (B, K, D) and ``target`` (B, K, K);
    fp32 scalar."""
    _check(tokens, target)
    if _triton_ok(tokens, target):
        return self_similarity_mse_triton(tokens, target)
    return self_similarity_mse_reference(tokens, target)
