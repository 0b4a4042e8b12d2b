"""Is the block before the cut "residual + output projection", and where is its norm? Plus the norm algebra
that a post-norm block's least-squares target needs."""

from __future__ import annotations

import torch
from torch import nn

from compressor.blocks import BlockAdapter, BlockInputs
from compressor.errors import InputError
from compressor.replaceme.walk import _Capture


def _norm_candidates(adapter: BlockAdapter, index: int) -> list[tuple[str, nn.Module]]:
    block = adapter.blocks()[index]
    names = [n for n, _ in block.named_modules()]
    after = names.index(adapter.out_proj_name) if adapter.out_proj_name in names else 0
    return [(n, m) for k, (n, m) in enumerate(block.named_modules()) if k > after and "norm" in type(m).__name__.lower()]


@torch.no_grad()
def check_structure(adapter: BlockAdapter, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> dict:
    """Verify block `index` computes z = a + m with m its out projection's output (z = output, or the input of
    the post-norm). Zeroing m must change z by exactly m. Finds the post-norm when the adapter does not name it."""

    def run(zero: bool, norm):
        cap = _Capture(adapter, index, zero_m=zero, post_norm=norm)
        try:
            out = adapter.run_block(index, hidden, inputs)
        finally:
            cap.close()
        return cap, out

    def err(norm) -> float:
        c1, o1 = run(False, norm)
        c0, o0 = run(True, norm)
        z1, z0 = (c1.z, c0.z) if norm is not None else (o1, o0)
        if z1 is None or c1.m is None or z1.shape != c1.m.shape:
            return float("inf")
        scale = float(z1.abs().max()) + 1e-12
        e = float((z1 - z0 - c1.m).abs().max()) / scale
        if norm is not None:  # a post-norm's output must be the block output itself
            if c1.norm_out is None or c1.norm_out.shape != o1.shape:
                return float("inf")
            e = max(e, float((c1.norm_out - o1).abs().max()) / (float(o1.abs().max()) + 1e-12))
        return e

    tol = 1e-4 if hidden.dtype == torch.float32 else (1e-6 if hidden.dtype == torch.float64 else 1e-2)
    if adapter.post_norm_name is not None:
        e = err(adapter.post_norm(index))
        if e <= tol:
            return {"structure": "post-norm", "post_norm": adapter.post_norm_name, "residual_check_rel_err": e}
    else:
        e = err(None)
        if e <= tol:
            return {"structure": "pre-norm", "residual_check_rel_err": e}
        for name, mod in _norm_candidates(adapter, index):
            e2 = err(mod)
            if e2 <= tol:
                adapter.post_norm_name = name
                return {"structure": "post-norm", "post_norm": name, "residual_check_rel_err": e2}
    block = adapter.blocks()[index]
    raise InputError(
        f"block {index} ({type(block).__name__}) is not residual + '{adapter.out_proj_name}' output "
        f"(zeroing that projection changed the residual stream by something else; rel. error {e:.2e})",
        "pass out_proj='...' naming the Linear whose output is added to the residual (and post_norm='...' if a "
        "norm follows the add), or a BlockAdapter subclass")


def _ln_params(norm: nn.Module):
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
    centered = isinstance(norm, nn.LayerNorm) or b is not None
    return w, b, float(eps), centered


def _z_stats(z: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Per-token [mean, scale] of the pre-norm sum z ([N, 2], float64): all the LS target needs of z."""
    _, _, eps, centered = _ln_params(norm)
    zd = z.double()
    if centered:
        return torch.cat([zd.mean(-1, keepdim=True), (zd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()], -1)
    return torch.cat([torch.zeros_like(zd[:, :1]), (zd.pow(2).mean(-1, keepdim=True) + eps).sqrt()], -1)


def _post_norm_target(zs: torch.Tensor, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """z* with norm(z*) ≈ h, at the per-token mean/scale `zs` of the original pre-norm sum z (float64)."""
    w, b, eps, centered = _ln_params(norm)
    u = h.double()
    if b is not None:
        u = u - b.double()
    if w is not None:
        wd = w.double()
        u = u / torch.where(wd.abs() < 1e-6, torch.full_like(wd, 1e-6).copysign(wd), wd)
    mu_z, sd_z = zs[:, :1], zs[:, 1:2]
    if centered:
        un = (u - u.mean(-1, keepdim=True)) / (u.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return mu_z + sd_z * un
    return sd_z * u / (u.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _apply_norm(norm: nn.Module | None, z: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return z
    w, b, eps, centered = _ln_params(norm)
    w = w.detach().float() if w is not None else None
    b = b.detach().float() if b is not None else None
    if centered:
        return torch.nn.functional.layer_norm(z, (z.shape[-1],), w, b, eps)
    out = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return out * w if w is not None else out

