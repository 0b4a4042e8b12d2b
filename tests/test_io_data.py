import numpy as np
import pytest
import torch

from compressor.errors import InputError
from compressor.io.data import check_compatible, load_data


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_data("digits"), load_data("digits")
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert len(a.train) + len(a.test) == 1797
    assert a.train.tensors[0].shape[1:] == (1, 8, 8) and a.num_classes == 10
    assert float(a.train.tensors[0].max()) <= 1.0
    # no sample index appears in both splits: compare rows as bytes
    tr = {r.numpy().tobytes() + bytes([int(y)]) for r, y in zip(*a.train.tensors, strict=True)}
    te = [r.numpy().tobytes() + bytes([int(y)]) for r, y in zip(*a.test.tensors, strict=True)]
    # digits has a few exact duplicate images; allow those, but the split must not be the same rows
    assert sum(t in tr for t in te) < 10


def test_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.rand(40, 3).astype(np.float32), y=np.arange(40) % 4)
    d = load_data(f"npz:{p}")
    assert d.task == "classification" and d.num_classes == 4 and len(d.train) + len(d.test) == 40


def test_npz_without_labels_is_calibration(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.rand(20, 5).astype(np.float32))
    assert load_data(f"npz:{p}").task == "calibration"


@pytest.mark.parametrize("arrays,match", [({"a": np.zeros(3)}, "no array 'x'"), ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "same first dimension")])
def test_npz_bad(tmp_path, arrays, match):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(InputError, match=match):
        load_data(f"npz:{p}")


def test_npz_not_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_text("not numpy")
    with pytest.raises(InputError, match="cannot read"):
        load_data(f"npz:{p}")


def test_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n".join(f"sentence number {i} is here." for i in range(20)))
    d = load_data(f"text:{p}")
    assert len(d.texts) == 10 and len(d.test_texts) == 10 and not set(d.texts) & set(d.test_texts)


def test_text_too_short(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("one line\n")
    with pytest.raises(InputError, match="at least"):
        load_data(f"text:{p}")


def test_random_needs_shape():
    with pytest.raises(InputError):
        load_data("random")
    d = load_data("random", input_shape=(1, 8, 8))
    assert d.input_shape() == (1, 8, 8)


@pytest.mark.parametrize("spec", ["imagenet", "npz", "parquet:foo.parquet"])
def test_unknown_spec(spec):
    with pytest.raises(InputError, match="unknown data source"):
        load_data(spec)


def test_missing_files():
    with pytest.raises(InputError, match="not found"):
        load_data("npz:/no/such.npz")
    with pytest.raises(InputError, match="not found"):
        load_data("text:/no/such.txt")


def test_shape_incompatible():
    with pytest.raises(InputError, match="expects"):
        check_compatible(load_data("digits"), (3, 32, 32))
