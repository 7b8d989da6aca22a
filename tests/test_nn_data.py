"""Data layer: IDX/CIFAR parsing and its one-line errors, ImageNet folder checks, the batched
crop/flip against a per-image reference, normalisation constants, and the loader's order,
sharding and exact resume."""

import gzip
import io
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from nn.data import (DATASETS, Augment, DataBundle, StreamLoader, TensorLoader, channel_stats,
                     crop_flip, load_dataset, make_loader, make_synthetic, normalize,
                     random_crop_flip, read_cifar, read_fashion_mnist, read_idx, shard_indices,
                     stratified_indices)

FASHION = Path(DATASETS["fashion-mnist"].root)
FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ----------------------------------------------------------------------------------- IDX

IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path, a, *, gz, code=None, dims=None, extra=b"", cut=0):
    """An independent IDX writer: magic, big-endian dims, big-endian values."""
    a = np.asarray(a)
    code = IDX_CODES[a.dtype.str[1:]] if code is None else code
    dims = a.shape if dims is None else dims
    raw = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    raw += a.astype(a.dtype.newbyteorder(">")).tobytes() + extra
    raw = raw[:len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype, shape", [
    ("u1", (5, 4, 3)), ("i1", (7,)), ("i2", (2, 3)), ("i4", (3, 1, 2, 2)), ("f4", (4,)),
    ("f8", (2, 2))])
def test_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=shape) * 100).astype(dtype)
    back = read_idx(write_idx(tmp_path / "a.idx", a, gz=gz))
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == shape
    np.testing.assert_array_equal(back, a)
    back[...] = 0  # writable, not a view of the file buffer


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("kind, needles", [
    ("magic", ["bad IDX magic number 0x01000803", "expected 0x00000803"]),
    ("type", ["bad IDX magic number 0x00000703", "expected 0x00000803"]),
    ("ndim", ["bad IDX magic number 0x00000802", "expected 0x00000803 (uint8, 3 dims)"]),
    ("truncated", ["truncated IDX data", "expected 24 for shape (2, 3, 4)"]),
    ("trailing", ["trailing bytes", "27 data bytes, expected 24"]),
    ("header", ["truncated IDX header", "expected 16 bytes"]),
    ("short", ["truncated IDX file of 2 bytes"]),
])
def test_malformed_idx_is_a_one_line_error_naming_the_file(tmp_path, gz, kind, needles):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "bad-idx3-ubyte"
    if kind == "magic":
        write_idx(p, a, gz=gz)
        raw = bytearray(gzip.decompress(p.read_bytes()) if gz else p.read_bytes())
        raw[0] = 1
        p.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    elif kind == "type":
        write_idx(p, a, gz=gz, code=0x07)
    elif kind == "ndim":
        write_idx(p, a.reshape(6, 4), gz=gz)
    elif kind == "truncated":
        write_idx(p, a, gz=gz, cut=5)
    elif kind == "trailing":
        write_idx(p, a, gz=gz, extra=b"xyz")
    elif kind == "header":
        write_idx(p, a, gz=gz, cut=24 + 6)
    else:
        p.write_bytes(gzip.compress(b"\x00\x00") if gz else b"\x00\x00")
    with pytest.raises(ValueError) as e:
        read_idx(p, ndim=3, dtype=np.uint8)
    one_line(e, p, *needles)


def test_corrupt_gzip_and_missing_file(tmp_path):
    p = write_idx(tmp_path / "a.gz", np.zeros((3, 2, 2), np.uint8), gz=True)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError) as e:
        read_idx(p)
    one_line(e, p, "gzip")
    with pytest.raises(FileNotFoundError) as e:
        read_idx(tmp_path / "nope")
    one_line(e, tmp_path / "nope")


def write_fashion(folder, n_train=30, n_test=20, *, gz=True, labels_train=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data = {}
    for stem, n in zip(FASHION_FILES[::2], (n_train, n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        if stem.startswith("train") and labels_train is not None:
            y = labels_train
        write_idx(folder / (stem + (".gz" if gz else "")), x, gz=gz)
        write_idx(folder / (stem.replace("images-idx3", "labels-idx1") + (".gz" if gz else "")),
                  y, gz=gz)
        data[stem] = (x, y)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_folder_loads_gz_or_raw(tmp_path, gz):
    data = write_fashion(tmp_path, gz=gz)
    (xtr, ytr), (xte, yte) = read_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(xtr, data["train-images-idx3-ubyte"][0])
    np.testing.assert_array_equal(yte, data["t10k-images-idx3-ubyte"][1])
    b = load_dataset("fashion-mnist", tmp_path)
    assert b.train_x.shape == (30, 1, 28, 28) and b.test_x.shape == (20, 1, 28, 28)
    assert b.train_x.dtype == torch.uint8 and b.train_y.dtype == torch.int64
    assert torch.equal(b.train_x[:, 0], torch.from_numpy(xtr))
    assert b.num_classes == 10 and b.in_channels == 1 and b.image_size == 28
    assert b.augment == Augment(2, True) and b.mean == DATASETS["fashion-mnist"].mean


def test_fashion_mnist_missing_folder_names_files_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path / "x" / "y")
    one_line(e, tmp_path / "x" / "y", "no such folder", "dataset-fashion-mnist",
             *(f + ".gz" for f in FASHION_FILES))
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        read_fashion_mnist(tmp_path)
    assert one_line(e, tmp_path).split("; missing ")[1].startswith("t10k-labels-idx1-ubyte (")


def test_fashion_mnist_count_mismatch_and_bad_labels(tmp_path):
    write_fashion(tmp_path, labels_train=np.zeros(29, np.uint8))
    with pytest.raises(ValueError) as e:
        read_fashion_mnist(tmp_path)
    one_line(e, tmp_path / "train-images-idx3-ubyte.gz", "30 images",
             tmp_path / "train-labels-idx1-ubyte.gz", "29 labels")
    write_fashion(tmp_path, labels_train=np.full(30, 10, np.uint8))
    with pytest.raises(ValueError) as e:
        read_fashion_mnist(tmp_path)
    one_line(e, "train-labels-idx1-ubyte.gz", "label 10 out of range: expected 0..9")


@pytest.fixture(scope="module")
def real_fashion():
    if not all((FASHION / (f + ".gz")).is_file() for f in FASHION_FILES):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    return load_dataset("fashion-mnist")


def test_real_fashion_mnist(real_fashion):
    b = real_fashion
    assert b.train_x.shape == (60000, 1, 28, 28) and b.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(b.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(b.test_y), torch.full((10,), 1000))
    mean, std = channel_stats(b.train_x)
    assert mean == pytest.approx(DATASETS["fashion-mnist"].mean, abs=1e-7)
    assert std == pytest.approx(DATASETS["fashion-mnist"].std, abs=1e-7)
    x, _ = next(iter(make_loader(b, "test", 10000)))  # normalised test set: near standard
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_cifar_constants(name):
    try:
        (x, _), _, _ = read_cifar(None, name)
    except FileNotFoundError:
        pytest.skip(f"{name} not in ./data")
    mean, std = channel_stats(torch.from_numpy(x))
    assert mean == pytest.approx(DATASETS[name].mean, abs=1e-6)
    assert std == pytest.approx(DATASETS[name].std, abs=1e-6)


# ----------------------------------------------------------------------------------- CIFAR


def dump(path, obj, *, legacy=True):
    """Protocol 2 with numpy 1.x module names (as in the released files), or protocol 5."""
    raw = pickle.dumps(obj, protocol=2 if legacy else 5)
    if legacy:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def write_cifar(root, name, per_file=4, *, legacy=True):
    rng = np.random.default_rng(2)
    k = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if k == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if k == 10 else \
        ["train", "test"]
    out = {}
    for i, f in enumerate(files):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, k, per_file)]
        d = {b"data": data, b"batch_label": b"batch", b"filenames": [b"a.png"] * per_file}
        if k == 10:
            d[b"labels"] = fine
        else:
            d[b"fine_labels"], d[b"coarse_labels"] = fine, [v // 5 for v in fine]
        dump(folder / f, d, legacy=legacy)
        out[f] = (data, fine)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]} if k == 10 else \
        {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"g{i}".encode() for i in range(20)]}
    dump(folder / ("batches.meta" if k == 10 else "meta"), meta, legacy=legacy)
    return folder, out


@pytest.mark.parametrize("legacy", [True, False])
def test_cifar10_folder(tmp_path, legacy):
    folder, out = write_cifar(tmp_path, "cifar10", legacy=legacy)
    for root in (tmp_path, folder):  # the parent or the extracted folder itself
        (xtr, ytr), (xte, yte), classes = read_cifar(root, "cifar10")
        assert xtr.shape == (20, 3, 32, 32) and xte.shape == (4, 3, 32, 32)
        assert classes == tuple(f"c{i}" for i in range(10))
    data, labels = out["data_batch_3"]
    # row layout: 1024 red values (row-major 32x32), then green, then blue
    assert xtr[8, 0, 0, 5] == data[0, 5] and xtr[8, 1, 2, 3] == data[0, 1024 + 2 * 32 + 3]
    assert xtr[9, 2, 31, 31] == data[1, 3071]
    assert ytr[8:12].tolist() == labels and yte.tolist() == out["test_batch"][1]
    b = load_dataset("cifar10", tmp_path)
    assert b.train_x.shape == (20, 3, 32, 32) and b.augment == Augment(4, True)
    assert torch.equal(b.train_x, torch.from_numpy(xtr)) and b.classes[3] == "c3"


def test_cifar100_uses_fine_labels(tmp_path):
    folder, out = write_cifar(tmp_path, "cifar100", per_file=50)
    b = load_dataset("cifar100", folder)
    assert b.num_classes == 100 and b.train_x.shape == (50, 3, 32, 32)
    assert b.train_y.tolist() == out["train"][1] and b.test_y.tolist() == out["test"][1]
    assert b.train_y.max() >= 20  # fine, not coarse labels
    assert b.classes[:2] == ("f0", "f1") and len(b.classes) == 100


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", tmp_path)
    one_line(e, tmp_path / "cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch",
             "cifar-10-python.tar.gz")
    with pytest.raises(FileNotFoundError) as e:
        read_cifar(tmp_path, "cifar100")
    one_line(e, tmp_path / "cifar-100-python", "train, test")
    folder, _ = write_cifar(tmp_path, "cifar10")
    dump(folder / "data_batch_2", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]})
    with pytest.raises(ValueError) as e:
        read_cifar(tmp_path)
    one_line(e, folder / "data_batch_2", "2 'labels' for 3 images")
    dump(folder / "data_batch_2", {b"data": np.zeros((3, 1024), np.uint8), b"labels": [1, 2, 3]})
    with pytest.raises(ValueError) as e:
        read_cifar(tmp_path)
    one_line(e, folder / "data_batch_2", "(3, 1024)", "N x 3072")
    dump(folder / "data_batch_2", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
    with pytest.raises(ValueError) as e:
        read_cifar(tmp_path)
    one_line(e, "label 10 out of range: expected 0..9")
    (folder / "data_batch_2").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(ValueError) as e:
        read_cifar(tmp_path)
    one_line(e, folder / "data_batch_2", "unreadable pickle")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickles_cannot_run_code(tmp_path, capsys):
    folder, _ = write_cifar(tmp_path, "cifar10")
    dump(folder / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Evil()]})
    with pytest.raises(ValueError) as e:
        read_cifar(tmp_path)
    one_line(e, folder / "test_batch", "refusing to load global", ".print")
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------- ImageNet


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("imagenet", tmp_path / "inet")
    one_line(e, tmp_path / "inet", "train/<class>/*.JPEG", "missing train/, val/")
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "val" / "n02").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet", tmp_path)
    one_line(e, tmp_path / "val", "2 differ", "expected the same <class> folders")


def test_imagenet_without_torchvision_is_a_clear_error(tmp_path, monkeypatch):
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(RuntimeError) as e:
        load_dataset("imagenet", tmp_path)
    one_line(e, "torchvision is required for ImageNet", "pip install torchvision")


# ----------------------------------------------------------------------------------- tensor ops


def reference_crop_flip(x, pad, oy, ox, flip):
    out = []
    for i in range(len(x)):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, oy[i]:oy[i] + x.shape[2],
                                                 ox[i]:ox[i] + x.shape[3]]
        out.append(img.flip(-1) if flip is not None and flip[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize("shape, pad, with_flip", [
    ((64, 3, 32, 32), 4, True), ((50, 1, 28, 28), 2, True), ((9, 2, 5, 7), 3, True),
    ((16, 3, 8, 8), 2, False), ((8, 3, 6, 6), 0, True), ((1, 1, 1, 1), 1, True)])
def test_crop_flip_equals_per_image_reference(shape, pad, with_flip):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    B = shape[0]
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    flip = torch.rand(B, generator=g) < 0.5 if with_flip else None
    out = crop_flip(x, pad, oy, ox, flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_crop_flip(x, pad, oy, ox, flip))


def test_crop_flip_known_values_and_bounds():
    x = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # 1 2 3 / 4 5 6 / 7 8 9
    one = torch.ones(1, dtype=torch.long)
    # pad 1, window at (0, 0): shifted down-right by one, zeros enter top and left
    assert crop_flip(x, 1, 0 * one, 0 * one)[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert crop_flip(x, 1, one, one, torch.tensor([True]))[0, 0].tolist() == \
        [[3, 2, 1], [6, 5, 4], [9, 8, 7]]
    assert crop_flip(x, 1, 2 * one, 0 * one, torch.tensor([True]))[0, 0].tolist() == \
        [[5, 4, 0], [8, 7, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"ox must lie in \[0, 2\] for pad=1, got \[3, 3\]"):
        crop_flip(x, 1, one, 3 * one)


def test_random_crop_flip_distribution_and_identity():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(4000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert random_crop_flip(x, Augment(0, False), g) is x
    out = random_crop_flip(x, Augment(2, True), g)
    assert out.shape == x.shape
    # recover each image's (flip, oy, ox) from its centre pixel and its right neighbour
    c, r = out[:, 0, 8, 8].long(), out[:, 0, 8, 9].long()
    flipped = r < c
    assert abs(flipped.float().mean() - 0.5) < 0.03  # 4000 draws: 3 sigma ~ 0.024
    col = c % 16
    dx = torch.where(flipped, (15 - col) - 8, col - 8)  # shift applied before the flip
    dy = c // 16 - 8
    for d in (dx, dy):  # offsets uniform on -2..2
        counts = torch.bincount(d + 2, minlength=5)
        assert len(counts) == 5 and counts.min() > 800 - 90 and counts.max() < 800 + 90


def test_normalize_and_channel_stats():
    (x, _), _ = make_synthetic(300, 1, image_size=8, channels=3, seed=4)
    mean, std = channel_stats(x)
    xd = x.double() / 255
    assert mean == pytest.approx(xd.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(xd.permute(1, 0, 2, 3).reshape(3, -1).std(1, correction=0)
                                .tolist(), abs=1e-12)
    z = normalize(x, mean, std)
    ref = (xd - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert z.dtype == torch.float32 and torch.allclose(z.double(), ref, atol=1e-5)
    assert torch.allclose(z.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                          atol=1e-5)


def test_synthetic_is_seeded_balanced_and_learnable():
    (x, y), (xt, yt) = make_synthetic(800, 400, image_size=12, channels=2, num_classes=5, seed=7)
    (x2, y2), _ = make_synthetic(800, 400, image_size=12, channels=2, num_classes=5, seed=7)
    (x3, _), _ = make_synthetic(800, 400, image_size=12, channels=2, num_classes=5, seed=8)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert x.shape == (800, 2, 12, 12) and torch.equal(torch.bincount(y), torch.full((5,), 160))
    centres = torch.stack([x[y == k].float().mean(0) for k in range(5)]).flatten(1)
    pred = torch.cdist(xt.float().flatten(1), centres).argmin(1)
    assert (pred == yt).float().mean() > 0.9  # nearest class mean; chance is 0.2


def test_stratified_subset():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0])
    assert stratified_indices(y, 6, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert stratified_indices(y, 7, 3).tolist() == [0, 1, 2, 3, 4, 5, 6]  # class 0 gets 3
    assert torch.bincount(y[stratified_indices(y, 9, 3)]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="needs 4 images of class 1"):
        stratified_indices(y, 11, 3)
    b = load_dataset("synthetic", subset=40, n_train=200, n_test=10, num_classes=4)
    assert torch.equal(torch.bincount(b.train_y), torch.full((4,), 10))


def test_bundle_and_load_dataset_validation():
    b = load_dataset("synthetic", n_train=8, n_test=4, image_size=8)
    assert b.num_train == 8 and b.num_test == 4 and b.image_size == 8 and b.in_channels == 3
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        DataBundle("x", 4, 3, 8, (0.5,), (0.2,), None, tuple("abcd"), b.train_x, b.train_y,
                   b.test_x, b.test_y)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="apply to 'synthetic' only"):
        load_dataset("cifar10", image_size=8)


# ----------------------------------------------------------------------------------- loaders


def ids_loader(n=103, bs=10, **kw):
    """A loader whose labels are the sample ids, images encode them too."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorLoader(x, torch.arange(n), bs, **kw)


def epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_every_sample_once_per_epoch_and_seeded_order():
    a, b, c = ids_loader(seed=1), ids_loader(seed=1), ids_loader(seed=2)
    assert len(a) == 11
    e0, e1 = epoch(a), epoch(a)
    for e in (e0, e1):
        ys = torch.cat([y for _, y in e])
        assert torch.equal(ys.sort().values, torch.arange(103))
        assert [len(y) for _, y in e] == [10] * 10 + [3]
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    b0 = epoch(b)
    assert all(torch.equal(y, y2) for (_, y), (_, y2) in zip(e0, b0))
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in epoch(c)]))
    d = ids_loader(seed=1, drop_last=True)
    assert len(d) == 10 and sum(len(y) for _, y in d) == 100
    g = torch.Generator().manual_seed(1)  # an explicit generator is the same as seed=1
    assert torch.equal(torch.cat([y for _, y in ids_loader(generator=g)]),
                       torch.cat([y for _, y in e0]))


def test_eval_loader_is_in_order_and_unaugmented():
    b = load_dataset("synthetic", n_train=64, n_test=50, image_size=8)
    batches = epoch(make_loader(b, "test", 16))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), b.test_y)
    assert torch.equal(x, normalize(b.test_x, b.mean, b.std))
    tr = make_loader(b, "train", 16, train=False)  # train split, evaluation mode
    assert torch.equal(torch.cat([x for x, _ in tr]), normalize(b.train_x, b.mean, b.std))


def test_training_loader_augments_with_the_bundle_recipe():
    b = load_dataset("synthetic", n_train=64, n_test=8, image_size=16)
    assert b.augment == Augment(2, False)
    loader = make_loader(b, "train", 16, seed=5)
    assert loader.shuffle and loader.drop_last and loader.augment == Augment(2, False)
    xs = epoch(loader)
    clean = make_loader(b, "train", 16, seed=5, augment=False)
    ref = epoch(clean)
    assert all(torch.equal(y, y2) for (_, y), (_, y2) in zip(xs, ref))  # same order
    assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(xs, ref))  # cropped
    # each image is one of the 25 zero-padded shifts of its clean image, normalised
    order = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    shifts = [(torch.tensor([dy]), torch.tensor([dx])) for dy in range(5) for dx in range(5)]
    for bi, (x, _) in enumerate(xs):
        assert x.shape == (16, 3, 16, 16)
        for i, j in enumerate(order[16 * bi:16 * bi + 16].tolist()):
            assert any(torch.equal(x[i:i + 1], normalize(crop_flip(b.train_x[j:j + 1], 2, dy, dx),
                                                         b.mean, b.std)) for dy, dx in shifts)
    cl = make_loader(b, "train", 16, seed=5, channels_last=True)
    for (x, y), (x2, y2) in zip(epoch(cl), xs):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def take(loader, k):
    """The next k batches, across epochs; breaking out mid-epoch like a step-limited run."""
    out = []
    while len(out) < k:
        for x, y in loader:
            out.append((x.clone(), y.clone()))
            if len(out) == k:
                break
    return out


@pytest.mark.parametrize("stop", [0, 4, 11, "end"])
def test_state_restore_reproduces_the_continuation(stop):
    kw = dict(n=103, bs=10, seed=3, augment=Augment(1, True))
    ref = ids_loader(**kw)
    uninterrupted = epoch(ref) + epoch(ref) + epoch(ref)
    a = ids_loader(**kw)
    epoch(a)  # one full epoch first: the state must carry the epoch counter and RNG
    it = iter(a)
    done = 11 if stop == "end" else stop
    for _ in range(done):
        next(it)
    if stop == "end":
        assert next(it, None) is None  # the loop saw the epoch end
    buf = io.BytesIO()  # a checkpoint holds it: tensors and plain values only
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest = list(it)
    rest += take(a, 15 - len(rest))
    b = ids_loader(**kw)
    b.load_state_dict(state)
    if stop == 11:  # saved after the last batch, before the loop ended: nothing left of it
        assert epoch(b) == [] and b.epoch == 2
    again = take(b, 15)
    expected = uninterrupted[11 + done:11 + done + 15]
    for got in (rest, again):
        assert len(got) == 15
        for (x, y), (x2, y2) in zip(got, expected):
            assert torch.equal(y, y2) and torch.equal(x, x2)
    assert b.epoch == a.epoch and b.state_dict()["position"] == a.state_dict()["position"]


def test_reentering_an_abandoned_epoch_continues_it():
    kw = dict(n=50, bs=10, seed=4, augment=Augment(2, True))
    full = epoch(ids_loader(**kw))
    a = ids_loader(**kw)
    got = take(a, 2)  # break after two batches, then iterate again
    got += [(x.clone(), y.clone()) for x, y in a]
    assert len(got) == 5 and a.epoch == 1
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(got, full))


def test_set_epoch_skips_forward_like_an_uninterrupted_run():
    ref = ids_loader(seed=6)
    three = [epoch(ref) for _ in range(3)][2]
    a = ids_loader(seed=6)
    a.set_epoch(0)  # the current epoch: no-op
    take(a, 3)
    a.set_epoch(2)  # from the middle of epoch 0
    assert a.epoch == 2
    got = epoch(a)
    assert all(torch.equal(y, y2) for (_, y), (_, y2) in zip(got, three, strict=True))
    with pytest.raises(ValueError, match="cannot go back to epoch 1 from epoch 3"):
        a.set_epoch(1)


def test_state_is_checked():
    a = ids_loader(seed=0)
    with pytest.raises(ValueError, match="batch_size=10, this loader 20"):
        ids_loader(bs=20).load_state_dict(a.state_dict())


def test_rank_shards_are_disjoint_equal_and_cover_the_epoch():
    n, w = 103, 4
    for ep in range(2):
        shards = []
        for r in range(w):
            g = torch.Generator().manual_seed(9)
            for _ in range(ep + 1):
                s = shard_indices(n, r, w, generator=g)
            shards.append(s)
        assert {len(s) for s in shards} == {25}
        allidx = torch.cat(shards)
        assert len(set(allidx.tolist())) == 100 and allidx.max() < n
    # evaluation: no shuffle, every sample exactly once, sizes differ by at most one
    ev = [shard_indices(n, r, w, even=False) for r in range(w)]
    assert [len(s) for s in ev] == [26, 26, 26, 25]
    assert torch.equal(torch.cat(ev).sort().values, torch.arange(n))
    # loaders: each rank's batches together form one epoch of the shared permutation
    loaders = [ids_loader(seed=9, rank=r, world_size=w) for r in range(w)]
    assert {len(x) for x in loaders} == {3}
    ys = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert len(set(torch.cat(ys).tolist())) == 100
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        shard_indices(10, 4, 4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), w=st.integers(1, 7), seed=st.integers(0, 2**31), even=st.booleans())
def test_shards_partition_the_epoch_for_any_size(n, w, seed, even):
    shards = [shard_indices(n, r, w, generator=torch.Generator().manual_seed(seed), even=even)
              for r in range(w)]
    allidx = torch.cat(shards).tolist()
    assert len(allidx) == len(set(allidx))  # disjoint
    assert len(allidx) == (n - n % w if even else n) and set(allidx) <= set(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= (0 if even else 1)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 4), seed=st.integers(0, 2**31), with_flip=st.booleans())
def test_crop_flip_matches_reference_for_any_shape(b, c, h, w, pad, seed, with_flip):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)
    oy, ox = (torch.randint(0, 2 * pad + 1, (b,), generator=g) for _ in range(2))
    flip = torch.rand(b, generator=g) < 0.5 if with_flip else None
    assert torch.equal(crop_flip(x, pad, oy, ox, flip), reference_crop_flip(x, pad, oy, ox, flip))


class ImageList(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def test_stream_loader_matches_the_tensor_loader():
    b = load_dataset("synthetic", n_train=37, n_test=8, image_size=8)
    kw = dict(shuffle=True, drop_last=False, mean=b.mean, std=b.std, seed=2, rank=1,
              world_size=2)
    t = TensorLoader(b.train_x, torch.arange(37), 5, **kw)
    s = StreamLoader(ImageList(b.train_x), lambda im: im, 5, num_workers=0, **kw)
    assert len(s) == len(t) == 4
    for (x, y), (x2, y2) in zip(epoch(t), epoch(s), strict=True):
        assert torch.equal(y, y2) and torch.equal(x, x2)
    it = iter(s)
    next(it)
    state = s.state_dict()
    rest = [y for _, y in it]
    s2 = StreamLoader(ImageList(b.train_x), lambda im: im, 5, num_workers=0, **kw)
    s2.load_state_dict(state)
    assert all(torch.equal(y, y2) for y, y2 in zip(rest, [y for _, y in s2], strict=True))
