"""Recipe parameters that several stages share, declared once.

* Training hyper-parameters: :class:`TrainParams` (every stage that trains) and :class:`SGDParams` (those that
  also let the recipe pick the optimizer). Each field's type carries its constraint and meaning, so a stage that
  needs another default re-annotates with the same type (``lr: LearningRate = 0.05``) instead of re-declaring it.
* Include/exclude globs: :func:`globs` gives every method's ``include:`` / ``exclude:`` the help text of their one
  meaning (:mod:`compressor.utils.selectors`).

Not a method module (the leading underscore keeps compressor.methods from loading it as one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.utils.selectors import PATTERN_HELP

Epochs = Annotated[float, Field(gt=0, description="training length in passes over the training split")]
LearningRate = Annotated[float, Field(gt=0, description="learning rate (the peak when a schedule changes it)")]
Momentum = Annotated[float, Field(ge=0, lt=1, description="SGD momentum")]
WeightDecay = Annotated[float, Field(ge=0, description="weight decay (decoupled for AdamW)")]
BatchSize = Annotated[int, Field(ge=1, description="training examples per optimizer step")]
OptimizerName = Literal["sgd", "adam", "adamw"]
CosineOrConstant = Literal["constant", "cosine"]


class TrainParams(BaseModel):
    """The hyper-parameters every training stage has (finetune, gradual, imp_rewind, sara, qdistill)."""

    model_config = ConfigDict(extra="forbid")
    epochs: Epochs = 3.0
    lr: LearningRate = 0.01
    weight_decay: WeightDecay = 0.0
    batch_size: BatchSize = 64


class SGDParams(TrainParams):
    """Training stages whose recipe chooses the optimizer (SGD with momentum by default)."""

    optimizer: OptimizerName = "sgd"
    momentum: Momentum = 0.9


def globs(what: str, *, empty_list: bool = False) -> Any:
    """A pydantic Field for an include/exclude list, default None (or [] with `empty_list`): `what` says what
    the patterns select in this method."""
    if empty_list:
        return Field(default_factory=list, description=f"{PATTERN_HELP} {what}")
    return Field(None, description=f"{PATTERN_HELP} {what}")
