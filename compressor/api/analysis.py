"""analyze(): the coupled channel groups of any model (ONNX file, torch module or checkpoint, Hugging Face folder
or config.json), without loading weights where the model's config allows it."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import InputError
from compressor.io.data import DataBundle, load_data
from compressor.io.models import load_model
from compressor.io.sources import from_torch


def analyze(model, *, arch: str | None = None, trust_pickle: bool = False, data=None, exporter: str = "auto", note=None,
            weightless: bool = True):
    """Coupled channel groups of any model the CLI accepts (ONNX, torch checkpoint, HF folder, nn.Module): ONNX is
    analysed directly, the rest is exported first (compressor.analysis_export: torch's default exporter, the
    TorchScript one as fallback; initializer names = torch parameter names). `Analysis.export` says which.

    A Hugging Face folder or a bare config.json is analysed weightless (compressor.graph.weightless: traced on
    the meta device, weights never loaded; names are the checkpoint's state-dict names). When that trace fails
    a folder with weights falls back to the full export, and `note` (default: warnings.warn) gets one line."""
    import warnings

    import onnx
    from torch import nn

    from compressor.analysis_export import export_for_analysis
    from compressor.graph import analyze as analyze_onnx
    from compressor.graph.torch_bridge import distinct_copy
    from compressor.wrappers import wrap

    if isinstance(model, onnx.ModelProto | bytes) or (isinstance(model, str | Path) and str(model).endswith(".onnx")):
        return analyze_onnx(model)
    if weightless and isinstance(model, str | Path) and _hf_config_path(Path(model)):
        from compressor.graph.weightless import analyze_hf
        from compressor.skeleton import is_config_only

        try:
            return analyze_hf(model)
        except InputError:
            raise
        except Exception as e:  # a model the meta-device trace cannot handle: the full export may
            if is_config_only(model):
                raise InputError(f"{model}: cannot trace this config without weights ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:100]})", "pass the folder with its weights") from e
            (note or (lambda m: warnings.warn(m, stacklevel=3)))(
                f"weightless analysis failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                "loading the weights and exporting instead")
    loaded = wrap(model) if isinstance(model, nn.Module) else load_model(model, arch=arch, trust_pickle=trust_pickle)
    if loaded.onnx is not None:
        return analyze_onnx(loaded.onnx)
    if isinstance(data, str):
        bundle = load_data(data)
    else:  # a DataBundle, None, or a torch Dataset / DataLoader / iterable of batches
        bundle = data if data is None or isinstance(data, DataBundle) else from_torch(data)
    example = loaded.make_example(bundle)
    exported = export_for_analysis(distinct_copy(loaded.module), example, exporter)
    a = analyze_onnx(exported.model)
    a.export = exported.info()
    return a


def _hf_config_path(p: Path) -> bool:
    """An HF folder (config.json inside) or a config.json itself: what the weightless analysis reads."""
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".json")
