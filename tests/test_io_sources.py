"""imagefolder / csv / jsonl data sources and torch Datasets, on small data written here.

Oracles: the pixel values and folder names written by the test, the row counts, and the accuracy of the
pretrained digits CNN (100 % on its own digits is only reached when pixels, layout and labels all line up).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.errors import InputError
from compressor.io.data import load_data

runner = CliRunner()
ARCH = ["--arch", "compressor.models:digits_cnn"]
CLASSES = ["zero", "one", "two"]  # sorted: one(0) two(1) zero(2): label ids follow the sorted names


@pytest.fixture(scope="module")
def digit_samples():
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.where(d.target == c)[0][:20] for c in range(3)])
    return d.images[keep], d.target[keep]  # pixel values 0..16


def write_folder(root, images, targets):
    """Digit c goes to folder CLASSES[c]; pixels scaled to 0..255 exactly (multiples of 16 → value*16 - 0)."""
    for i, (img, t) in enumerate(zip(images, targets, strict=True)):
        folder = root / CLASSES[t]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 15).astype(np.uint8), "L").save(folder / f"{i}.png")  # 16*15 = 240 ≤ 255
    return root


def write_table(path, images, targets, fmt):
    cols = [f"p{i}" for i in range(64)]
    if fmt == "csv":
        lines = [",".join(["id", *cols, "digit"])]
        lines += [",".join([f"s{i}", *(str(v / 16) for v in img.ravel()), str(t)]) for i, (img, t) in enumerate(zip(images, targets, strict=True))]
    else:
        lines = [json.dumps({"id": f"s{i}", **{c: v / 16 for c, v in zip(cols, img.ravel(), strict=True)}, "digit": int(t)})
                 for i, (img, t) in enumerate(zip(images, targets, strict=True))]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args):
    return runner.invoke(app, list(args))


def test_imagefolder_pixels_and_labels(tmp_path, digit_samples):
    images, targets = digit_samples
    root = write_folder(tmp_path / "imgs", images, targets)
    b = load_data(f"imagefolder:{root}?size=8,8&mode=L")
    x = torch.cat([b.train.tensors[0], b.test.tensors[0]])
    y = torch.cat([b.train.tensors[1], b.test.tensors[1]])
    assert x.shape == (60, 1, 8, 8) and len(b.test) == 15  # 25 % of 60 held out
    assert b.meta["classes"] == sorted(CLASSES)
    written = {tuple((img * 15 / 255).astype(np.float32).ravel().round(5)): sorted(CLASSES).index(CLASSES[t])
               for img, t in zip(images, targets, strict=True)}
    for xi, yi in zip(x, y, strict=True):
        assert written[tuple(xi.numpy().ravel().round(5))] == int(yi)
    # normalisation: (v - mean) / std on every pixel
    n = load_data(f"imagefolder:{root}?size=8,8&mode=L&mean=0.5&std=0.25")
    assert torch.allclose(n.test.tensors[0], (b.test.tensors[0] - 0.5) / 0.25, atol=1e-6)
    # the model's input shape picks size and mode when none is given
    assert load_data(f"imagefolder:{root}", input_shape=(3, 4, 5)).input_shape() == (3, 4, 5)


def test_imagefolder_cli_and_api(tmp_path, digit_samples, cnn_state_file, trained_cnn):
    images, targets = digit_samples
    # folders named by the digit, so the folder label ids are the digits the CNN predicts
    root = tmp_path / "imgs"
    for i, (img, t) in enumerate(zip(images, targets, strict=True)):
        (root / f"d{t}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 15).astype(np.uint8), "L").save(root / f"d{t}" / f"{i}.png")
    r = cli("eval", str(cnn_state_file), *ARCH, "-d", f"imagefolder:{root}", "--input-shape", "1,8,8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] > 0.9
    m = compressor.evaluate_model(trained_cnn, data=f"imagefolder:{root}?size=8,8&mode=L", latency=False)
    assert m["accuracy"] > 0.9


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_tables_cli_and_api(tmp_path, digit_samples, cnn_state_file, trained_cnn, fmt):
    images, targets = digit_samples
    path = write_table(tmp_path / f"d.{fmt}", images, targets, fmt)
    b = load_data(f"{fmt}:{path}?label=digit&shape=1,8,8")
    assert len(b.train) + len(b.test) == 60 and len(b.test) == 15 and b.num_classes == 3
    assert b.meta["features"] == [f"p{i}" for i in range(64)]  # 'id' is text: not a feature by default
    x, y = b.test.tensors
    rows = {tuple((img / 16).astype(np.float32).ravel().round(5)): t for img, t in zip(images, targets, strict=True)}
    assert all(rows[tuple(xi.numpy().ravel().round(5))] == int(yi) for xi, yi in zip(x, y, strict=True))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ft\nstages:\n  - method: finetune\n    epochs: 0.2\n")
    r = cli("run", str(cnn_state_file), *ARCH, "-r", str(recipe), "-d", f"{fmt}:{path}?label=digit", "--input-shape", "1,8,8", "-o", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["accuracy"] > 0.9 and report["data"] == f"{fmt}:{path}"
    m = compressor.evaluate_model(trained_cnn, data=f"{fmt}:{path}?label=digit&features={','.join(f'p{i}' for i in range(64))}",
                                  input_shape=(1, 8, 8), latency=False)
    assert m["accuracy"] > 0.9


def test_text_column(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"sentence": f"line {i}", "label": i % 2}) for i in range(8)) + "\n")
    b = load_data(f"jsonl:{p}?text=sentence")
    assert sorted(b.texts + b.test_texts) == sorted(f"line {i}" for i in range(8)) and len(b.test_texts) == 2
    assert all(int(t.split()[1]) % 2 == lab for t, lab in zip(b.test_texts, b.meta["test_labels"], strict=True))


class Digits(Dataset):
    """A map-style dataset of (x, y) items, as a training pipeline has."""

    def __init__(self, images, targets):
        self.x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16
        self.y = [int(t) for t in targets]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_torch_dataset_and_dataloader(tmp_path, digit_samples, trained_cnn):
    images, targets = digit_samples
    ds = Digits(images, targets)
    for data in (ds, DataLoader(ds, batch_size=7), [(ds.x[i:i + 8], torch.tensor(ds.y[i:i + 8])) for i in range(0, 60, 8)]):
        m = compressor.evaluate_model(trained_cnn, data=data, latency=False)
        assert m["accuracy"] > 0.9
    res = compressor.compress(trained_cnn, {"name": "ft", "stages": [{"method": "finetune", "epochs": 0.2}]},
                              data=DataLoader(ds, batch_size=16), output=tmp_path / "o", measure_latency=False)
    assert res.report["data"] == "torch:DataLoader" and (tmp_path / "o" / "report.json").exists()
    groups = compressor.analyze(trained_cnn, data=DataLoader(ds, batch_size=8))  # example inputs from the loader
    assert len(groups.groups) == len(compressor.analyze(trained_cnn, data="digits").groups) > 0
    from compressor.io.sources import from_torch

    b = from_torch(ds)
    assert len(b.train) + len(b.test) == 60 and len(b.test) == 15
    with pytest.raises(InputError, match="GiB"):
        from_torch(ds, cap_bytes=1000)


def bad_cases(tmp, images, targets):
    """(spec, needle) for each kind of bad data; the files are written here."""
    root = write_folder(tmp / "bad_img", images[:6], targets[:6] * 0)
    (root / "zero" / "broken.png").write_bytes(b"not a png")
    empty = tmp / "empty"
    empty.mkdir()
    noimg = write_folder(tmp / "noimg", images[:4], targets[:4] * 0)
    (noimg / "one").mkdir()
    (noimg / "one" / "notes.txt").write_text("x")
    csv_ok = write_table(tmp / "ok.csv", images[:6], targets[:6], "csv")
    lines = csv_ok.read_text().splitlines()
    lines[3] = lines[3].replace(",0.0,", ",abc,", 1)
    (tmp / "nan.csv").write_text("\n".join(lines) + "\n")
    (tmp / "neg.jsonl").write_text("\n".join(json.dumps({"a": 1.0, "label": lab}) for lab in (0, 1, -1, 0)) + "\n")
    (tmp / "big.jsonl").write_text("\n".join(json.dumps({f"p{i}": 0.5 for i in range(64)} | {"label": lab}) for lab in (0, 1, 12, 0)) + "\n")
    (tmp / "frac.jsonl").write_text("\n".join(json.dumps({"a": 1.0, "label": lab}) for lab in (0, 1.5, 1, 0)) + "\n")
    return [
        (f"imagefolder:{root}", f"{root / 'zero' / 'broken.png'}"),
        (f"imagefolder:{empty}", "no class sub-folders"),
        (f"imagefolder:{noimg}", f"{noimg / 'one'} holds no images"),
        (f"csv:{csv_ok}?label=y", "no label column 'y' (columns: id, p0"),
        (f"csv:{csv_ok}?label=digit&features=p0,q9", "no column 'q9'"),
        (f"csv:{tmp / 'nan.csv'}?label=digit", f"{tmp / 'nan.csv'}:4:p"),
        (f"jsonl:{tmp / 'neg.jsonl'}", f"{tmp / 'neg.jsonl'}:3:label"),
        (f"jsonl:{tmp / 'frac.jsonl'}", f"{tmp / 'frac.jsonl'}:2:label"),
        (f"imagefolder:{root}?colour=red", "unknown option"),
        (f"jsonl:{tmp / 'big.jsonl'}", "labels go up to 12 but the model has 10 outputs"),
    ]


def test_bad_data_one_line_exit_2(tmp_path, digit_samples, cnn_state_file):
    images, targets = digit_samples
    assert_refused(bad_cases(tmp_path, images, targets), cnn_state_file, tmp_path)


def assert_refused(cases, cnn_state_file, tmp_path):
    """Each (spec, needle): `compress run` on the digits CNN exits 2 with one line holding needle, writing nothing."""
    for spec, needle in cases:
        out = tmp_path / "out"
        r = cli("run", str(cnn_state_file), *ARCH, "-r", "demo", "-d", spec, "--input-shape", "1,8,8", "-o", str(out))
        assert r.exit_code == 2, (spec, r.output)
        assert len(r.output.strip().splitlines()) == 1 and needle in r.output.replace("\n", ""), (spec, r.output)
        assert not out.exists()

