"""`hf:PATH` data: Hugging Face datasets written here by the `datasets` package itself (save_to_disk, DatasetDict,
to_parquet) as the oracle of the on-disk format, read back by compressor with pyarrow alone.

Oracles: the pixels, texts and labels written by the test, the split sizes chosen by the test, and the accuracy of
the pretrained digits CNN (above 90 % only when pixels, layout and labels all line up).
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.errors import InputError
from compressor.io.data import load_data
from tests.test_io_sources import assert_refused

datasets = pytest.importorskip("datasets", reason="datasets (the test extra) is not installed")
pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet")

runner = CliRunner()
ARCH = ["--arch", "compressor.models:digits_cnn"]
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def digit_samples():
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.where(d.target == c)[0][:8] for c in range(10)])
    return d.images[keep], d.target[keep]


def pil(img):
    return Image.fromarray((img * 15).astype(np.uint8), "L")  # 16 * 15 = 240 <= 255


def image_dataset(images, targets):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS)})
    return datasets.Dataset.from_dict({"image": [pil(i) for i in images], "label": [int(t) for t in targets]}, features=feats)


def written(images, targets):
    """{pixels as decoded (value*15/255): label} — what every decoded row must map back to."""
    return {tuple((img * 15 / 255).astype(np.float32).ravel().round(5)): int(t) for img, t in zip(images, targets, strict=True)}


def check_rows(ds, table):
    x, y = ds.tensors
    for xi, yi in zip(x, y, strict=True):
        assert table[tuple(xi.numpy().ravel().round(5))] == int(yi)


def cli(*args):
    return runner.invoke(app, list(args))


def test_save_to_disk_images(tmp_path, digit_samples, cnn_state_file, trained_cnn):
    images, targets = digit_samples
    image_dataset(images, targets).save_to_disk(str(tmp_path / "ds"), num_shards=2)  # two shards: both are read
    b = load_data(f"hf:{tmp_path / 'ds'}?size=8,8&mode=L")
    assert b.num_classes == 10 and b.input_shape() == (1, 8, 8)
    assert len(b.train) + len(b.test) == 80 and len(b.test) == 20  # 25 % of one dataset held out
    for part in (b.train, b.test):
        check_rows(part, written(images, targets))
    # the model's input shape picks size and mode; CLI and API reach the CNN's accuracy
    r = cli("eval", str(cnn_state_file), *ARCH, "-d", f"hf:{tmp_path / 'ds'}", "--input-shape", "1,8,8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] > 0.9
    assert compressor.evaluate_model(trained_cnn, data=f"hf:{tmp_path / 'ds'}", input_shape=(1, 8, 8), latency=False)["accuracy"] > 0.9


def test_dataset_dict_splits(tmp_path, digit_samples, cnn_state_file):
    images, targets = digit_samples
    full = image_dataset(images, targets)
    test_rows = list(range(0, 80, 5))  # 16 rows: the test split as the DatasetDict declares it
    dd = datasets.DatasetDict({"train": full.select([i for i in range(80) if i not in test_rows]), "test": full.select(test_rows)})
    dd.save_to_disk(str(tmp_path / "dd"))
    b = load_data(f"hf:{tmp_path / 'dd'}?size=8,8&mode=L")
    assert len(b.test) == 16 and len(b.train) == 64 and b.meta["splits"] == ["train", "test"]
    check_rows(b.test, written(images[test_rows], targets[test_rows]))
    only = load_data(f"hf:{tmp_path / 'dd'}?size=8,8&mode=L&split=test")  # one split: the 25 % rule inside it
    assert len(only.train) + len(only.test) == 16 and len(only.test) == 4
    out = tmp_path / "out"
    r = cli("run", str(cnn_state_file), *ARCH, "-r", "demo", "-d", f"hf:{tmp_path / 'dd'}", "--input-shape", "1,8,8", "-o", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == f"hf:{tmp_path / 'dd'}" and report["before"]["accuracy"] > 0.9


def test_parquet_file_folder_glob(tmp_path, digit_samples, trained_cnn):
    images, targets = digit_samples
    ds = image_dataset(images, targets)
    ds.to_parquet(str(tmp_path / "one.parquet"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select(range(60)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(60, 80)).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    one = load_data(f"hf:{tmp_path / 'one.parquet'}?size=8,8&mode=L")
    assert len(one.train) + len(one.test) == 80 and len(one.test) == 20 and one.num_classes == 10
    hub = load_data(f"hf:{tmp_path / 'hub'}?size=8,8&mode=L")  # split named by the file names
    assert len(hub.train) == 60 and len(hub.test) == 20
    check_rows(hub.test, written(images[60:], targets[60:]))
    glob = load_data(f"hf:{tmp_path / 'hub' / 'data' / 'train-*.parquet'}?size=8,8&mode=L")
    assert len(glob.train) + len(glob.test) == 60
    m = compressor.evaluate_model(trained_cnn, data=f"hf:{tmp_path / 'hub'}?size=8,8&mode=L", latency=False)
    assert m["accuracy"] > 0.9
    lim = load_data(f"hf:{tmp_path / 'one.parquet'}?size=8,8&mode=L&limit=12")
    assert len(lim.train) + len(lim.test) == 12


def test_image_paths_and_plain_parquet(tmp_path, digit_samples):
    """Images stored as files (the Image feature's path field) and a parquet file written by pyarrow without
    any Hugging Face metadata (the struct column is recognised by its bytes field)."""
    images, targets = digit_samples
    for i, img in enumerate(images[:6]):
        pil(img).save(tmp_path / f"{i}.png")
    # paths relative to the dataset file, as a parquet file beside its images holds them
    pq.write_table(pa.table({"img": [{"bytes": None, "path": f"{i}.png"} for i in range(6)], "labels": [int(t) for t in targets[:6]]}),
                   tmp_path / "paths.parquet")
    b = load_data(f"hf:{tmp_path / 'paths.parquet'}?size=8,8&mode=L&image=img")
    check_rows(b.train, written(images[:6], targets[:6]))
    table = pa.table({"picture": [{"bytes": (tmp_path / f"{i}.png").read_bytes(), "path": None} for i in range(6)],
                      "y": [int(t) for t in targets[:6]]})
    pq.write_table(table, tmp_path / "plain.parquet")
    p = load_data(f"hf:{tmp_path / 'plain.parquet'}?size=8,8&mode=L&label=y")
    check_rows(p.test, written(images[:6], targets[:6]))
    assert p.meta["column"] == "picture"


def test_text_and_numeric_columns(tmp_path):
    texts = [f"sentence number {i}" for i in range(12)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": texts[:8], "label": [i % 3 for i in range(8)]}),
                               "validation": datasets.Dataset.from_dict({"sentence": texts[8:], "label": [i % 3 for i in range(8, 12)]})})
    dd.save_to_disk(str(tmp_path / "txt"))
    b = load_data(f"hf:{tmp_path / 'txt'}")
    assert b.task == "embedding" and b.texts == texts[:8] and b.test_texts == texts[8:]  # validation is held out
    assert b.meta["test_labels"] == [i % 3 for i in range(8, 12)]
    datasets.Dataset.from_dict({"a": [float(i) for i in range(8)], "v": [[i, -i] for i in range(8)], "label": [0, 1] * 4}
                               ).to_parquet(str(tmp_path / "num.parquet"))
    n = load_data(f"hf:{tmp_path / 'num.parquet'}")
    x, y = torch.cat([n.train.tensors[0], n.test.tensors[0]]), torch.cat([n.train.tensors[1], n.test.tensors[1]])
    assert n.meta["features"] == ["a", "v"] and x.shape == (8, 3)
    assert all(row.tolist() == [i, i, -i] and int(lab) == i % 2 for row, lab in zip(x, y, strict=True) for i in [int(row[0])])


def test_hf_dataset_through_a_dataloader(digit_samples, trained_cnn):
    """A `datasets` Dataset in torch format through a DataLoader: dict batches {image, label}; forward_fn says how
    the model takes them (and the example inputs are what it passes to the model)."""
    from torch.utils.data import DataLoader

    images, targets = digit_samples
    ds = image_dataset(images, targets).with_format("torch")
    calls = []

    def forward_fn(model, batch):
        calls.append(sorted(batch))
        return model(batch["image"].float().reshape(-1, 1, 8, 8) / 255)

    m = compressor.evaluate_model(trained_cnn, data=DataLoader(ds, batch_size=16), forward_fn=forward_fn, latency=False)
    assert m["accuracy"] > 0.9 and calls[0] == ["image", "label"]
    assert m["macs"] == compressor.evaluate_model(trained_cnn, data="digits", latency=False)["macs"]  # traced on 1×8×8 inputs


def bad_cases(tmp, images, targets):
    """(spec, needle) for each kind of bad data; the datasets are written here."""
    ds = image_dataset(images[:8], targets[:8])
    rows = ds.to_dict()
    rows["image"][5] = {"bytes": b"not a png", "path": None}
    feats = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=DIGITS)})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp / "broken"))
    datasets.Dataset.from_dict({"image": rows["image"][:5], "label": [0, 1, 12, 0, 1]},
                               features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
                               ).to_parquet(str(tmp / "big.parquet"))
    datasets.Dataset.from_dict({"image": rows["image"][:4], "label": [0, 1, -1, 0]},
                               features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
                               ).to_parquet(str(tmp / "neg.parquet"))
    # a ClassLabel of 2 names with a 3rd class id: written with pyarrow (datasets refuses to encode it)
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["a", "b"], "_type": "ClassLabel"}}}}
    t = pa.table({"image": rows["image"][:4], "label": [0, 1, 2, 0]}).replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(t, tmp / "classlabel.parquet")
    (tmp / "notes").mkdir()
    return [
        (f"hf:{tmp / 'broken'}", f"{tmp / 'broken' / 'data-00000-of-00001.arrow'} row 5"),
        (f"hf:{tmp / 'broken'}?label=digit", "no column 'digit' (columns: image, label)"),
        (f"hf:{tmp / 'big.parquet'}", "labels go up to 12 but the model has 10 outputs"),
        (f"hf:{tmp / 'neg.parquet'}", f"{tmp / 'neg.parquet'} row 2, column 'label': label -1"),
        (f"hf:{tmp / 'classlabel.parquet'}", f"{tmp / 'classlabel.parquet'} row 2, column 'label': label 2 is out of range"),
        (f"hf:{tmp / 'notes'}", "no save_to_disk folder, no .parquet files"),
    ]


def test_bad_data_one_line_exit_2(tmp_path, digit_samples, cnn_state_file):
    images, targets = digit_samples
    assert_refused(bad_cases(tmp_path, images, targets), cnn_state_file, tmp_path)


def test_without_pyarrow_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(InputError, match="pip install pyarrow"):
        load_data(f"hf:{tmp_path}")
