"""Quantized distillation (Polino et al. 2018): train a student whose forward/backward runs on Q(w) while the
optimizer updates full-precision shadow weights w (straight-through), with a distillation loss from a
teacher. Runs through the shared loop `compressor.train.train` via its hooks:

    before_step:    save w, write Q(w) into the parameters   (step 1)
    loss/backward:  gradient computed at Q(w)                 (step 2)
    after_backward: restore w (the gradient stays)            (step 3, the optimizer then steps w)
    end:            the model holds Q(w)                      (step 4)

Which tensors [CHOICE]: the weights of Conv1d/2d/3d and Linear layers (what ONNX Conv/Gemm/MatMul and
onnxruntime's MatMulNBits consume). The paper quantizes every parameter (biases, BN affine); here biases,
norms and any other layer type stay float and are *reported* (layer, type, reason) — they are < 2 % of the
parameters of the models we ship and quantizing them gains no deployable size. With
``quantize_first_last=False`` all parameters of the first and the last quantizable layer stay float
(the intended behaviour; the reference skips only the first and last parameter tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import InputError
from compressor.quant.quantizer import QuantizedTensor, check_bits, quantize_tensor

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class QuantConfig:
    bits: int = 4
    bucket_size: int | None = 256
    scaling: str = "linear"
    layout: str = "row"
    stochastic: bool = False
    quantize_first_last: bool = True
    embedding_bits: int | None = None  # nn.Embedding tables: None = float; else per-row (one bucket per token)

    def __post_init__(self):
        check_bits(self.bits)
        if self.embedding_bits is not None:
            check_bits(self.embedding_bits)


@dataclass
class QuantPlan:
    """Which parameters are quantized and which layers stay float (and why)."""

    params: dict[str, nn.Parameter] = field(default_factory=dict)  # "fc1.weight" -> parameter
    skipped: list[dict] = field(default_factory=list)  # {"layer", "type", "reason"}
    overrides: dict[str, dict] = field(default_factory=dict)  # per-parameter quantizer settings (embeddings)

    def report(self) -> dict:
        return {"quantized": list(self.params), "kept_float": self.skipped}


def plan_quantization(model: nn.Module, quantize_first_last: bool = True, embedding_bits: int | None = None) -> QuantPlan:
    """Weights of Conv/Linear layers are quantized (and nn.Embedding tables when embedding_bits is set, one
    bucket per row so a lookup dequantizes only its rows); every other layer that owns parameters is reported."""
    plan = QuantPlan()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not layers:
        raise InputError("the model has no Conv or Linear layer to quantize",
                         "quantized distillation quantizes Conv1d/2d/3d and Linear weights")
    skip = {layers[0][0], layers[-1][0]} if not quantize_first_last else set()
    for name, mod in model.named_modules():
        own = [pn for pn, _ in mod.named_parameters(recurse=False)]
        if not own:
            continue
        if isinstance(mod, QUANTIZABLE):
            if name in skip:
                plan.skipped.append({"layer": name, "type": type(mod).__name__, "reason": "first/last layer kept float (quantize_first_last: false)"})
                continue
            plan.params[f"{name}.weight" if name else "weight"] = mod.weight
            continue
        if isinstance(mod, nn.Embedding) and embedding_bits is not None:
            plan.params[f"{name}.weight"] = mod.weight
            plan.overrides[f"{name}.weight"] = {"bits": embedding_bits, "bucket_size": None, "layout": "row", "stochastic": False}
            continue
        plan.skipped.append({"layer": name or "(root)", "type": type(mod).__name__,
                             "reason": "no quantized kernel for this layer type; kept float"})
    return plan


class ShadowQuantizer:
    """Full-precision shadow weights + quantized forward. Use `hooks()` with train()."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, seed: int = 0):
        self.model, self.cfg = model, cfg
        self.plan = plan_quantization(model, cfg.quantize_first_last, cfg.embedding_bits)
        self.shadow: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed) if cfg.stochastic else None

    def _q(self, name: str, w: torch.Tensor, stochastic: bool | None = None) -> QuantizedTensor:
        c = self.cfg
        kw = {"bits": c.bits, "bucket_size": c.bucket_size, "layout": c.layout, "stochastic": c.stochastic if stochastic is None else stochastic}
        kw.update(self.plan.overrides.get(name, {}))
        gen = self.gen if (self.gen is not None and kw["stochastic"] and w.device.type == "cpu") else None
        return quantize_tensor(w, kw["bits"], kw["bucket_size"], scaling=c.scaling, layout=kw["layout"], stochastic=kw["stochastic"], generator=gen)

    @torch.no_grad()
    def quantize_(self) -> None:
        """Save w and write Q(w) into the parameters."""
        for name, p in self.plan.params.items():
            self.shadow[name] = p.detach().clone()
            p.copy_(self._q(name, p).dequantize().to(p.dtype))

    @torch.no_grad()
    def restore_(self) -> None:
        for name, p in self.plan.params.items():
            if name in self.shadow:
                p.copy_(self.shadow[name])
        self.shadow.clear()

    @torch.no_grad()
    def finalize_(self) -> dict[str, QuantizedTensor]:
        """Write Q(w) (deterministic rounding) into the model; returns the integer form per parameter."""
        self.restore_()
        out = {}
        for name, p in self.plan.params.items():
            q = self._q(name, p, stochastic=False)
            p.copy_(q.dequantize().to(p.dtype))
            out[name] = _cpu(q)
        return out

    def hooks(self) -> dict:
        return {"before_step": lambda m, step: self.quantize_(), "after_backward": lambda m: self.restore_()}


def _cpu(q: QuantizedTensor) -> QuantizedTensor:
    q.codes, q.scale = q.codes.cpu(), q.scale.cpu()
    q.offset = None if q.offset is None else q.offset.cpu()
    q.codebook = None if q.codebook is None else q.codebook.detach().cpu()
    q.zero_point = None if q.zero_point is None else q.zero_point.cpu()
    return q


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.7, kl_reduction: str = "batchmean") -> torch.Tensor:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y) (Hinton et al.'s distillation loss).

    kl_reduction "batchmean" (modern) or "elementwise_mean" (the reference's PyTorch-0.3 KLDivLoss, which
    divides by batch × classes). Without labels the CE term is dropped (pure distillation).
    """
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student output shape {list(student_logits.shape)} differs from the teacher's {list(teacher_logits.shape)}",
                         "give a student with the same number of outputs as the teacher")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True)
    kl = kl / (s.shape[0] if kl_reduction == "batchmean" else s.numel())
    soft = temperature**2 * kl
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits.float(), labels)


def check_output_shapes(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
    """Refuse before training when teacher and student outputs differ (e.g. 10 vs 5 classes)."""
    with torch.no_grad():
        was_t, was_s = teacher.training, student.training
        teacher.eval(), student.eval()
        try:
            t, s = teacher(example), student(example)
        finally:
            teacher.train(was_t), student.train(was_s)
    if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor):
        raise InputError("quantized distillation needs models that return a logits tensor", "wrap the model so forward() returns logits")
    if t.shape != s.shape:
        raise InputError(f"teacher output shape {list(t.shape)} differs from the student's {list(s.shape)}",
                         "pick a student with the same output layer as the teacher (same number of classes)")


def make_kd_loss(teacher: nn.Module | None, temperature: float, alpha: float, kl_reduction: str = "batchmean"):
    """loss_fn(model, batch) for train(): distillation when a teacher is given, plain CE otherwise."""

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        out = model(x)
        if teacher is None:
            if y is None:
                raise InputError("training without a teacher needs labels", "give labelled data or a teacher")
            return F.cross_entropy(out.float(), y)
        with torch.no_grad():
            t = teacher(x)
        return distillation_loss(out, t, y, temperature, alpha, kl_reduction)

    return loss_fn


def quantized_distillation(student: nn.Module, dataset, *, teacher: nn.Module | None, cfg: QuantConfig, epochs: float = 10,
                           lr: float = 1e-2, batch_size: int = 64, momentum: float = 0.9, nesterov: bool = True,
                           weight_decay: float = 2.2e-4, temperature: float = 2.0, alpha: float = 0.7,
                           kl_reduction: str = "batchmean", cosine: bool = True, seed: int = 0, device=None,
                           progress: bool = True, loss_fn=None, optimizer: str = "sgd", steps: int | None = None
                           ) -> tuple[dict[str, QuantizedTensor], dict]:
    """Train `student` in place with quantized weights; returns ({param: QuantizedTensor}, info).

    teacher=None trains the same quantized student with plain cross-entropy (the no-distillation baseline).
    loss_fn(model, batch) replaces the logits distillation loss (e.g. feature distillation of an encoder,
    where the teacher is captured by the closure); optimizer "sgd" (Nesterov, the paper) or "adamw".
    """
    from compressor.device import module_device
    from compressor.train import train, training_device

    # the student trains on `device` (default: where it is) and comes back to the caller's device, as does the
    # teacher (borrowed, so it is moved back too)
    student_home = module_device(student)
    device = training_device(student, device)
    teacher_home = module_device(teacher) if teacher is not None else None
    if teacher is not None and loss_fn is None:
        check_output_shapes(teacher.cpu(), student.cpu(), dataset[:2][0])
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(seed)
    sq = ShadowQuantizer(student, cfg, seed=seed)
    student.to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    info = train(student, dataset, epochs=None if steps else epochs, steps=steps, batch_size=batch_size, lr=lr, optimizer=opt,
                 cosine=cosine, loss_fn=loss_fn or make_kd_loss(teacher, temperature, alpha, kl_reduction), seed=seed, device=device,
                 progress=progress, description=f"{cfg.bits}-bit {'distillation' if teacher is not None else 'training'}",
                 **sq.hooks())
    qt = sq.finalize_()
    student.to(student_home).eval()
    if teacher_home is not None:
        teacher.to(teacher_home)
    if not math.isfinite(info["final_loss"]):
        raise InputError("quantized training diverged (loss is not finite)", "lower lr")
    info["plan"] = sq.plan.report()
    return qt, info


def post_training_quantize(model: nn.Module, cfg: QuantConfig) -> tuple[dict[str, QuantizedTensor], dict]:
    """Round-to-nearest with the same quantizer, no training (the paper's "post-mortem" quantization baseline)."""
    sq = ShadowQuantizer(model, cfg)
    return sq.finalize_(), {"plan": sq.plan.report()}
