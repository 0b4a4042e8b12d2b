"""Differentiable quantization (Polino et al. 2018): learn non-uniform quantization points per tensor; the
weights themselves stay frozen.

Per quantized tensor: bucket-scaled weights u ∈ [0, 1] (min-max per bucket, as in quantizer.py) and s = 2^b points
p ∈ R^s, initialised at the quantiles of u (or uniformly). Forward maps each u to its nearest point
(exact ties go to the upper point) and de-scales per bucket, so Q(w)_i = p[j(i)]·α_b(i) + β_b(i) and
autograd gives ∂L/∂p_j = Σ_{i→j} α_b(i)·∂L/∂Q(w)_i (step 5). After each optimizer step the points are
re-sorted. The teacher is the unquantised model being quantised (reference behaviour). BN running stats
are those of the quantised model (the forward runs in train mode on Q(w)).

Not implemented: automatic bit allocation by gradient norm (step 3) and the "mixed" schedule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from compressor.quant.qat import QuantConfig, _cpu, make_kd_loss, plan_quantization
from compressor.quant.quantizer import QuantizedTensor, bucketize, check_bits, unbucket


class DiffQuantModel(nn.Module):
    """Wraps a model; its only trainable parameters are the quantization points."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, init: str = "quantiles"):
        super().__init__()
        check_bits(cfg.bits)
        self.model, self.cfg = model, cfg
        self.plan = plan_quantization(model, cfg.quantize_first_last)
        self.names = list(self.plan.params)
        s = 2**cfg.bits
        self.points = nn.ParameterList()
        self._u, self._alpha, self._beta, self._k = [], [], [], []
        for name in self.names:
            w = self.plan.params[name].detach().float()
            b, k = bucketize(w, cfg.bucket_size, cfg.layout)
            lo = b.min(1).values
            a = b.max(1).values - lo
            a = torch.where(a < 1e-10, torch.ones_like(a), a)
            u = (b - lo[:, None]) / a[:, None]
            if init == "quantiles":
                flat = u.flatten()
                if flat.numel() > 2**24:  # torch.quantile's input limit
                    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
                p = torch.quantile(flat, torch.linspace(0, 1, s))
            else:
                p = torch.linspace(0, 1, s)
            self.points.append(nn.Parameter(p.clone()))
            for lst, t in ((self._u, u), (self._alpha, a), (self._beta, lo)):
                lst.append(t)
            self._k.append(k)
        for p in model.parameters():
            p.requires_grad_(False)

    def _to(self, i: int, dev):
        return self._u[i].to(dev), self._alpha[i].to(dev), self._beta[i].to(dev)

    @staticmethod
    def assign(u: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Index of the nearest point (points sorted); a value exactly halfway goes to the upper point."""
        mids = (points[1:] + points[:-1]) / 2
        return torch.bucketize(u, mids.detach(), right=True)

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.names):
            p = self.points[i]
            u, a, lo = self._to(i, p.device)
            idx = self.assign(u, p)
            q = p[idx] * a[:, None] + lo[:, None]
            out[name] = unbucket(q, self.plan.params[name].shape, self.cfg.layout, self._k[i])
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.quantized_weights(), args, kwargs, strict=False)

    @torch.no_grad()
    def sort_points_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-sort the points (step 6); the optimizer's per-point state (momentum) follows its point."""
        for p in self.points:
            vals, perm = torch.sort(p)
            p.copy_(vals)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.copy_(v[perm])

    @torch.no_grad()
    def finalize_(self) -> dict[str, QuantizedTensor]:
        """Write Q(w) into the wrapped model; returns the codebook form per parameter."""
        self.sort_points_()
        out = {}
        for i, name in enumerate(self.names):
            p = self.points[i]
            u, a, lo = self._to(i, p.device)
            idx = self.assign(u, p)
            qt = QuantizedTensor(idx.to(torch.int16), a.float(), lo.float(), tuple(self.plan.params[name].shape), self.cfg.bits,
                                 self.cfg.layout, self._k[i], "linear", codebook=p.detach().float().clone())
            self.plan.params[name].copy_(qt.dequantize().to(self.plan.params[name].device))
            out[name] = _cpu(qt)
        for prm in self.model.parameters():
            prm.requires_grad_(True)
        return out


def differentiable_quantization(model: nn.Module, dataset, *, cfg: QuantConfig, teacher: nn.Module | None = None,
                                epochs: float = 5, lr: float = 1e-5, batch_size: int = 64, momentum: float = 0.9,
                                temperature: float = 2.0, alpha: float = 0.7, kl_reduction: str = "batchmean",
                                init: str = "quantiles", seed: int = 0, device=None, progress: bool = True
                                ) -> tuple[dict[str, QuantizedTensor], dict]:
    """Learn quantization points of `model` in place (its weights become Q(w)); returns codebooks + info.

    teacher defaults to a frozen copy of the unquantised model itself (as in the paper).
    """
    from compressor.device import module_device
    from compressor.train import train, training_device

    # trains on `device` (default: where the model is); model and a borrowed teacher go back where they were
    model_home = module_device(model)
    device = training_device(model, device)
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher_home = module_device(teacher)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    dq = DiffQuantModel(model, cfg, init).to(device)
    opt = torch.optim.SGD(list(dq.points), lr=lr, momentum=momentum, nesterov=momentum > 0)
    info = train(dq, dataset, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=opt,
                 loss_fn=make_kd_loss(teacher, temperature, alpha, kl_reduction), seed=seed, device=device,
                 progress=progress, description=f"{cfg.bits}-bit differentiable quantization",
                 after_step=lambda m, step: dq.sort_points_(opt))
    qt = dq.finalize_()
    model.to(model_home).eval()
    teacher.to(teacher_home)
    info["plan"] = dq.plan.report()
    return qt, info
