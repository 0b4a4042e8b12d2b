"""`finetune` stage: train the current model on the task data with the shared loop.

Masks kept as parametrizations stay exactly zero (the forward multiplies by the mask); structurally
pruned models simply train at their new width.
"""

from __future__ import annotations

from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import CosineOrConstant, SGDParams
from compressor.recipe import StageContext, register_method


class FinetuneParams(SGDParams):
    schedule: CosineOrConstant = "cosine"


@register_method("finetune", FinetuneParams, help="fine-tune the current model on the labelled training data", kinds=("torch",),
                 needs_labels="train", fp32=True, memory_needed=lambda fp, p: mem.training(fp, p.optimizer, p.momentum))
def run_finetune(ctx: StageContext, p: FinetuneParams) -> dict:
    from compressor.eval import accuracy
    from compressor.train import train

    data = ctx.data
    if data is None or data.task != "classification" or data.train is None:
        raise RecipeError("the finetune stage needs labelled data", "pass --data digits or --data npz:FILE with x and y arrays")
    before = accuracy(ctx.model, data.test) if data.test is not None else None
    info = train(ctx.model, data.train, epochs=p.epochs, lr=p.lr, optimizer=p.optimizer, momentum=p.momentum,
                 weight_decay=p.weight_decay, batch_size=p.batch_size, cosine=p.schedule == "cosine", seed=ctx.seed,
                 device=ctx.device, description="fine-tuning")
    ctx.model.cpu().eval()
    after = accuracy(ctx.model, data.test) if data.test is not None else None
    return {"steps": info["steps"], "final_loss": info["final_loss"], "accuracy_before": before, "accuracy_after": after}
