"""An ONNX graph (``onnx.ModelProto``): run in onnxruntime on the execution provider of its device
(``compressor.device``), counted from its initializers and inferred shapes, saved verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor import device as devices
from compressor.wrappers.base import Model


class OnnxModel(Model):
    kind = "onnx"
    fixed_dtype = True
    saved_as = "onnx"  # the file kind save() writes

    @classmethod
    def build(cls, *, module=None, onnx=None, tokenizer=None, **fields) -> OnnxModel:
        return cls(onnx, **fields)

    def __init__(self, proto, **kwargs):
        super().__init__(**kwargs)
        self.onnx = proto
        self._device = torch.device("cpu")

    # placement -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> OnnxModel:
        self._device = devices.resolve(device)
        return self

    def session(self, threads: int | None = None):
        from compressor.eval.runtime import ort_session

        return ort_session(self.onnx, threads, device=self._device)  # from a path when large (onnx_files)

    # inputs ----------------------------------------------------------------------------------------------

    def make_example(self, data, input_shape=None, batch: int = 8):
        from compressor.onnx_utils import example_feeds

        feeds = example_feeds(self.onnx, batch=batch)
        if data is not None and data.test is not None and len(feeds) == 1:
            name = next(iter(feeds))
            feeds[name] = data.test.tensors[0][:batch].numpy().astype(feeds[name].dtype)
        return feeds

    def input_shape(self, example=None):
        from compressor.onnx_utils import input_shape

        return input_shape(self.onnx)

    def reference_inputs(self, data, example):
        return example  # the example feeds

    # running ---------------------------------------------------------------------------------------------

    def outputs(self, x, batch_size: int = 256) -> torch.Tensor:
        from compressor.eval.runtime import ort_feeds, ort_run_batched

        sess = self.session()
        if isinstance(x, dict):
            out = sess.run(None, ort_feeds(sess, x))[0]
        else:
            out = ort_run_batched(sess, x, batch_size)
        return torch.from_numpy(np.asarray(out))

    def runner(self, example):
        from compressor.eval.latency import onnx_runner

        return onnx_runner(self.session(), example)

    def latency_runtime(self) -> str:
        from compressor.eval.runtime import ort_providers

        on_gpu = ort_providers(self._device)[0] == "CUDAExecutionProvider"
        return f"onnxruntime-{devices.label(self._device)}" if on_gpu else "onnxruntime"

    # costs -----------------------------------------------------------------------------------------------

    def param_counts(self) -> tuple[int, int]:
        from compressor.eval.metrics import onnx_param_count

        return onnx_param_count(self.onnx)

    def macs(self, example) -> int:
        from compressor.eval.metrics import onnx_macs

        return onnx_macs(self.onnx)

    def size_bytes(self) -> int:
        from compressor.onnx_files import model_bytes

        return model_bytes(self.onnx)

    # saving ----------------------------------------------------------------------------------------------

    def save(self, folder: Path, stem: str = "model", example=None) -> dict:
        return {"onnx": self.export_onnx(Path(folder) / f"{stem}.onnx", example)["path"]}

    def export_onnx(self, path: Path, example, *, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
        from compressor.onnx_utils import save_onnx_verified

        return save_onnx_verified(self.onnx, Path(path), example)
