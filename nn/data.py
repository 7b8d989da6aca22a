"""Training data: Fashion-MNIST (IDX), CIFAR-10/100 (python pickles), ImageNet (class folders,
streaming), a seeded synthetic set; batched tensor augmentation; a seedable, resumable,
shardable loader.  Nothing is ever downloaded.

Two paths, one batch format (``x`` float32 normalised ``(B, C, H, W)``, ``y`` int64):

* **Tensor path** (``fashion-mnist``, ``cifar10``, ``cifar100``, ``synthetic``): the whole set
  sits on the training device as ``uint8 (N, C, H, W)`` (1 byte a pixel: CIFAR-10's training set
  is 150 MB) and :class:`TensorLoader` gathers a batch, crops/flips it with one gather
  (:func:`crop_flip`) and normalises it in one pass -- no per-image Python.
* **Streaming path** (``imagenet``): torchvision's ``ImageFolder`` decodes JPEGs in DataLoader
  workers (RandomResizedCrop(224) + flip to train, Resize(256) + CenterCrop(224) to evaluate);
  workers return ``uint8`` and normalisation happens on the device, as above.

Per-dataset recipe (:data:`DATASETS`, the one home of these defaults).  Mean/std are per channel
over the *training* set in [0, 1] (population std, ddof=0), computed once with
:func:`channel_stats` and hard-coded; ImageNet keeps the usual constants of pretrained models.

* Fashion-MNIST: pad 2 + flip.  Garments are scaled so their longest side fills the 28x28 frame:
  measured on the training set, every image has ink in its outer 2-pixel band, which holds 10.7%
  of all ink; the outer 4-pixel band holds 27.0%, so pad 4 would crop away up to a quarter of a
  garment.  Flipping is label-preserving (a mirrored shirt, bag or shoe is the same class; only
  footwear has a consistent catalogue orientation) and is common practice on this set.
* CIFAR-10/100: pad 4 + flip (the standard ResNet recipe).  Synthetic: pad ``size // 8``, no flip.

Shuffling, sharding and resuming (:class:`TensorLoader`, :class:`StreamLoader`): epoch ``e``'s
order is one ``randperm`` drawn from a CPU ``torch.Generator`` (same seed on every rank);
rank ``r`` of ``w`` takes ``order[r::w]`` (:func:`shard_indices`).  ``state_dict()`` stores the
generator state at the start of the current epoch and the batches already delivered, so a
restored loader redraws the same permutation and continues with the next batch.  Augmentation
draws come from a generator re-seeded per batch from ``(seed, rank, epoch, batch)``, so a resumed
run also repeats the exact crops and flips (tensor path), whichever rank saved the state.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "Augment", "DatasetSpec", "DATASETS", "DataBundle", "load_dataset", "make_loader",
    "TensorLoader", "StreamLoader", "read_idx", "read_fashion_mnist", "read_cifar",
    "make_synthetic", "channel_stats", "normalize", "crop_flip", "random_crop_flip",
    "shard_indices", "stratified_indices",
]

_NO_DOWNLOAD = "pass root= / --data-dir; nothing is downloaded"
STREAM_WORKERS = min(8, os.cpu_count() or 1)
"""Default DataLoader workers for the streaming (ImageNet) path."""
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Augment:
    """Batched augmentation of the tensor path: random crop after ``pad`` zero pixels on each
    side (``pad=0``: none), then a horizontal flip with probability 1/2 if ``flip``."""

    pad: int = 0
    flip: bool = False

    def __post_init__(self):
        if not isinstance(self.pad, int) or isinstance(self.pad, bool) or self.pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {self.pad!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be a bool, got {self.flip!r}")

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset name means: shape, normalisation, augmentation and default folder."""

    title: str
    num_classes: int | None
    in_channels: int
    image_size: int | None
    mean: tuple[float, ...] | None  # None: computed from the generated training set
    std: tuple[float, ...] | None
    augment: Augment | None  # None: the streaming recipe (RandomResizedCrop + flip)
    root: str | None  # default folder; None: generated


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec("Fashion-MNIST", 10, 1, 28, (0.28604060,), (0.35302424,),
                                 Augment(2, True), "/usr/share/datasets/fashion-mnist"),
    "cifar10": DatasetSpec("CIFAR-10", 10, 3, 32, (0.49139968, 0.48215841, 0.44653091),
                           (0.24703223, 0.24348513, 0.26158784), Augment(4, True), "data"),
    "cifar100": DatasetSpec("CIFAR-100", 100, 3, 32, (0.50707516, 0.48654887, 0.44091784),
                            (0.26733429, 0.25643846, 0.27615047), Augment(4, True), "data"),
    "imagenet": DatasetSpec("ImageNet", None, 3, IMAGENET_CROP, (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), None, "data/imagenet"),
    "synthetic": DatasetSpec("synthetic", None, 3, None, None, None, None, None),
}

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


# --------------------------------------------------------------------------- IDX (Fashion-MNIST)

_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _idx_code(dtype) -> int:
    want = np.dtype(dtype)
    for code, dt in _IDX_TYPES.items():
        if dt.kind == want.kind and dt.itemsize == want.itemsize:
            return code
    raise ValueError(f"dtype {want} has no IDX type code")


def read_idx(path, *, ndim: int | None = None, dtype=None) -> np.ndarray:
    """Parse an IDX file, gzip-compressed (detected by its magic bytes) or raw.

    Layout: magic ``00 00 TT NN`` (``TT`` type code: 08 u8, 09 i8, 0B i16, 0C i32, 0D f32,
    0E f64; ``NN`` number of dimensions), then ``NN`` big-endian uint32 sizes, then the values
    big-endian, row-major.  ``ndim``/``dtype`` state what the caller expects.  Returns a
    writable native-endian array; any mismatch is a one-line ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({_line(e)}): expected a "
                             f"gzip-compressed IDX file") from None
    if ndim is not None and dtype is not None:
        want = f"0x{_idx_code(dtype) << 8 | ndim:08x} ({np.dtype(dtype)}, {ndim} dims)"
    else:
        want = "0x0000TTNN (TT an IDX type code, NN >= 1 dims)"
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file of {len(raw)} bytes: expected a 4-byte "
                         f"magic number {want}")
    magic = struct.unpack(">I", raw[:4])[0]
    code, nd = raw[2], raw[3]
    dt = _IDX_TYPES.get(code)
    if raw[0] or raw[1] or dt is None or nd == 0 or (ndim is not None and nd != ndim) or (
            dtype is not None and code != _idx_code(dtype)):
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}: expected {want}")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes): expected {header} "
                         f"bytes for {nd} dimension sizes")
    dims = struct.unpack(f">{nd}I", raw[4:header])
    count = math.prod(dims)
    need, have = count * dt.itemsize, len(raw) - header
    if have != need:
        what = "truncated IDX data" if have < need else "trailing bytes after the IDX data"
        raise ValueError(f"{path}: {what}: {have} data bytes, expected {need} for shape "
                         f"{tuple(dims)} of {dt.newbyteorder('=')}")
    return np.frombuffer(raw, dtype=dt, count=count, offset=header).reshape(dims).astype(
        dt.newbyteorder("="))


_FASHION_STEMS = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def read_fashion_mnist(root=None):
    """``((x_train, y_train), (x_test, y_test))`` as uint8 numpy arrays, ``x`` ``(N, 28, 28)``.

    Each of the four files may be ``<name>.gz`` (as shipped) or uncompressed ``<name>``."""
    root = Path(root if root is not None else DATASETS["fashion-mnist"].root)
    root = root.expanduser().absolute()
    stems = [s for pair in _FASHION_STEMS for s in pair]
    found = {s: next((p for p in (root / f"{s}.gz", root / s) if p.is_file()), None)
             for s in stems}
    missing = [s for s in stems if found[s] is None]
    if missing:
        where = f"{root}" + ("" if root.is_dir() else " (no such folder)")
        raise FileNotFoundError(
            f"Fashion-MNIST not found: expected {', '.join(s + '.gz' for s in stems)} (or "
            f"uncompressed) in {where}; missing {', '.join(missing)} (install the Debian package "
            f"dataset-fashion-mnist or {_NO_DOWNLOAD})")
    out = []
    for img_stem, lab_stem in _FASHION_STEMS:
        ip, lp = found[img_stem], found[lab_stem]
        x = read_idx(ip, ndim=3, dtype=np.uint8)
        y = read_idx(lp, ndim=1, dtype=np.uint8)
        if x.shape[1:] != (28, 28):
            raise ValueError(f"{ip}: images of {x.shape[1]}x{x.shape[2]} pixels: expected 28x28")
        if len(x) != len(y):
            raise ValueError(f"{ip} has {len(x)} images but {lp} has {len(y)} labels: expected "
                             f"one label per image")
        if len(y) and y.max() >= 10:
            raise ValueError(f"{lp}: label {int(y.max())} out of range: expected 0..9")
        out.append((x, y))
    return tuple(out)


# --------------------------------------------------------------------------- CIFAR pickles


class _Cifar(NamedTuple):
    title: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    archive: str


_CIFAR = {
    "cifar10": _Cifar("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in
                      range(1, 6)), ("test_batch",), "batches.meta", "labels", "label_names", 10,
                      "cifar-10-python.tar.gz"),
    "cifar100": _Cifar("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta",
                       "fine_labels", "fine_label_names", 100, "cifar-100-python.tar.gz"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Loads dicts, lists, strings and numpy arrays only: a CIFAR file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
        for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                          ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, expected: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle raises anything from EOFError to KeyError
        raise ValueError(f"{path}: unreadable pickle ({_line(e)}): expected {expected}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: pickle holds {type(obj).__name__}: expected {expected}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, spec: _Cifar):
    expected = f"a dict with 'data' (uint8, N x 3072) and '{spec.label_key}'"
    d = _unpickle(path, expected)
    if "data" not in d or spec.label_key not in d:
        raise ValueError(f"{path}: keys {sorted(map(str, d))}: expected {expected}")
    data, labels = d["data"], np.asarray(d[spec.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' is {getattr(data, 'dtype', type(data).__name__)} of "
                         f"shape {getattr(data, 'shape', '?')}: expected {expected}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: {labels.size} '{spec.label_key}' for {len(data)} images: "
                         f"expected one integer label per image")
    bad = labels[(labels < 0) | (labels >= spec.num_classes)]
    if len(bad):
        raise ValueError(f"{path}: label {int(bad[0])} out of range: expected "
                         f"0..{spec.num_classes - 1}")
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(root=None, name: str = "cifar10"):
    """``((x_train, y_train), (x_test, y_test), classes)``; ``x`` uint8 ``(N, 3, 32, 32)``.

    ``root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its
    parent.  CIFAR-100 uses the 100 fine labels.  The class names come from the meta file when
    it is there.  Pickles are loaded with ``encoding="bytes"`` by an unpickler that only builds
    numpy arrays and plain containers."""
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {name!r}")
    spec = _CIFAR[name]
    root = Path(root if root is not None else DATASETS[name].root).expanduser().absolute()
    need = spec.train + spec.test
    folder = next((d for d in (root / spec.folder, root)
                   if all((d / f).is_file() for f in need)), None)
    if folder is None:
        d = root / spec.folder if (root / spec.folder).is_dir() else root
        missing = [f for f in need if not (d / f).is_file()]
        raise FileNotFoundError(
            f"{spec.title} not found: expected {', '.join(need)} in {root / spec.folder} or "
            f"{root}; missing {', '.join(missing)} in {d} (extract {spec.archive} there or "
            f"{_NO_DOWNLOAD})")
    splits = []
    for files in (spec.train, spec.test):
        parts = [_cifar_batch(folder / f, spec) for f in files]
        splits.append((np.concatenate([p[0] for p in parts]),
                       np.concatenate([p[1] for p in parts])))
    classes = tuple(str(i) for i in range(spec.num_classes))
    if (folder / spec.meta).is_file():
        names = _unpickle(folder / spec.meta, f"a dict with '{spec.names_key}'").get(
            spec.names_key)
        if not isinstance(names, list) or len(names) != spec.num_classes:
            raise ValueError(f"{folder / spec.meta}: expected '{spec.names_key}', a list of "
                             f"{spec.num_classes} class names")
        classes = tuple(n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names)
    return splits[0], splits[1], classes


# --------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int = 2048, n_test: int = 512, *, image_size: int = 16,
                   channels: int = 3, num_classes: int = 4, noise: float = 0.25, seed: int = 0):
    """A seeded, learnable set: ``((x_train, y_train), (x_test, y_test))`` torch tensors,
    ``x`` uint8 ``(N, channels, size, size)``, labels balanced and shuffled.

    Class ``k`` has a smooth template ``T_k`` (uniform 4x4 values per channel, bilinearly
    upsampled: features a few pixels wide survive small crops); an image is
    ``clip(T_y + noise * N(0, 1), 0, 1)`` in steps of 1/255."""
    for label, v in (("n_train", n_train), ("n_test", n_test), ("image_size", image_size),
                     ("channels", channels), ("num_classes", num_classes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be an int >= 1, got {v!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(low, size=(image_size, image_size),
                                                mode="bilinear", align_corners=False)

    def split(n):
        y = torch.randperm(n, generator=g) % num_classes
        x = templates[y] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8), y

    return split(n_train), split(n_test)


# --------------------------------------------------------------------------- tensor ops


def channel_stats(x: torch.Tensor, chunk: int = 1024):
    """Per-channel mean and population std of uint8 images ``(N, C, H, W)`` in [0, 1].

    Exact: a 256-bin histogram per channel, accumulated in chunks, then moments in float64."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    C = x.shape[1]
    offset = (torch.arange(C, device=x.device) * 256).view(1, C, 1, 1)
    hist = torch.zeros(C * 256, dtype=torch.int64, device=x.device)
    for i in range(0, len(x), chunk):
        hist += torch.bincount((x[i:i + chunk].long() + offset).flatten(), minlength=C * 256)
    h = hist.view(C, 256).double().cpu()
    v = torch.arange(256, dtype=torch.float64) / 255
    n = h.sum(1)
    mean = (h * v).sum(1) / n
    var = (h * (v - mean[:, None]) ** 2).sum(1) / n
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` to float32 ``(x / 255 - mean_c) / std_c``, computed in one fused
    pass as ``x * (1 / (255 std_c)) - mean_c / std_c``."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return torch.addcmul(-m / s, x.float(), 1 / (255 * s))


def _crop_flip(x, pad, oy, ox, flip):
    B, C, H, W = x.shape
    if B == 0:
        return x.clone()
    Hp, Wp = H + 2 * pad, W + 2 * pad
    buf = x.new_zeros((1 if flip is None else 2, B, C, Hp, Wp))
    buf[0, :, :, pad:pad + H, pad:pad + W] = x
    start = torch.arange(B, device=x.device)
    if flip is not None:
        buf[1, :, :, pad:pad + H, pad:pad + W] = x.flip(-1)
        start = start + B * flip.long()
        ox = torch.where(flip, 2 * pad - ox, ox)
    start = start * (C * Hp * Wp) + oy * Wp + ox
    last = (C - 1) * Hp * Wp + (H - 1) * Wp + (W - 1)  # offset of a window's last element
    windows = buf.view(-1).as_strided((buf.numel() - last, C, H, W), (1, Hp * Wp, Wp, 1))
    return windows[start]


def crop_flip(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``(B, C, H, W)`` images after zero padding, with per-image offsets, then flip.

    ``out[b] = F_b(pad(x[b])[:, oy_b : oy_b + H, ox_b : ox_b + W])``, ``0 <= oy_b, ox_b <= 2 pad``,
    ``F_b`` the horizontal flip where ``flip[b]``.  A flip commutes with symmetric padding and
    maps the window at column ``ox`` to the one at ``2 pad - ox``:
    ``flip(crop_ox(pad(x))) = crop_(2 pad - ox)(pad(flip(x)))``.  So one zero buffer holds
    ``[pad(x); pad(flip(x))]`` and image ``b`` is the window starting at flat offset
    ``s_b = ((flip_b B + b) C Hp + oy_b) Wp + ox'_b``.  The strided view
    ``V[t] = buf.flat[t + c Hp Wp + i Wp + j]`` (strides ``(1, Hp Wp, Wp, 1)``) makes the batch
    one gather ``V[s]``: no per-image Python and no per-pixel index grid."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    B = x.shape[0]
    for label, t in (("oy", oy), ("ox", ox)) + ((("flip", flip),) if flip is not None else ()):
        if t.shape != (B,) or t.device != x.device:
            raise ValueError(f"{label} must have shape ({B},) on {x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if flip is not None and flip.dtype != torch.bool:
        raise ValueError(f"flip must be a bool tensor, got {flip.dtype}")
    for label, t in (("oy", oy), ("ox", ox)):
        if B and (t.min() < 0 or t.max() > 2 * pad):
            raise ValueError(f"{label} must lie in [0, {2 * pad}] for pad={pad}, got "
                             f"[{int(t.min())}, {int(t.max())}]")
    return _crop_flip(x, pad, oy.long(), ox.long(), flip)


def random_crop_flip(x: torch.Tensor, augment: Augment,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`crop_flip` with offsets uniform on ``{0..2 pad}`` and flips with probability 1/2,
    drawn from ``generator`` (on ``x``'s device) in the order ``oy, ox, flip``."""
    B, dev = x.shape[0], x.device
    if not augment.active:
        return x
    oy = torch.randint(0, 2 * augment.pad + 1, (B,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * augment.pad + 1, (B,), generator=generator, device=dev)
    flip = (torch.randint(0, 2, (B,), generator=generator, device=dev) == 1
            if augment.flip else None)
    return _crop_flip(x, augment.pad, oy, ox, flip)


def shard_indices(n: int, rank: int = 0, world_size: int = 1, *,
                  generator: torch.Generator | None = None, even: bool = True) -> torch.Tensor:
    """This rank's sample indices for one epoch (int64, CPU).

    ``order = randperm(n, generator)`` (``arange(n)`` without a generator); with ``even`` the
    last ``n mod world_size`` entries are dropped (a different tail each shuffled epoch) so the
    shards are equally sized, as distributed training needs; without it every sample is kept and
    shard sizes differ by at most one (evaluation counts each image once).  Rank ``r`` takes
    ``order[r::world_size]``: the shards are disjoint and their union is ``order``."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, "
                         f"world_size={world_size!r}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if even:
        order = order[: n - n % world_size]
    return order[rank::world_size]


def stratified_indices(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """The first ``n // K`` images of each class in file order (one more for the first
    ``n mod K`` classes), returned in file order: a balanced, seed-free subset."""
    y = labels.cpu().long()
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(y):
        raise ValueError(f"subset must be an int in [1, {len(y)}], got {n!r}")
    quota = torch.full((num_classes,), n // num_classes)
    quota[: n % num_classes] += 1
    counts = torch.bincount(y, minlength=num_classes)
    short = (counts < quota).nonzero().flatten()
    if len(short):
        k = int(short[0])
        raise ValueError(f"subset={n} needs {int(quota[k])} images of class {k}, the training "
                         f"set has {int(counts[k])}")
    order = torch.sort(y, stable=True).indices
    rank_in_class = torch.arange(len(y)) - (counts.cumsum(0) - counts)[y[order]]
    return order[rank_in_class < quota[y[order]]].sort().values


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A loaded dataset: uint8 tensors on the device (tensor path) or datasets (streaming)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment | None  # tensor path's training augmentation; None when streaming
    classes: tuple[str, ...]
    train_x: torch.Tensor | None = field(default=None, repr=False)  # uint8 (N, C, H, W)
    train_y: torch.Tensor | None = field(default=None, repr=False)  # int64 (N,)
    test_x: torch.Tensor | None = field(default=None, repr=False)
    test_y: torch.Tensor | None = field(default=None, repr=False)
    train_set: object = field(default=None, repr=False)  # map-style dataset of (image, label)
    test_set: object = field(default=None, repr=False)
    transforms: tuple[Callable, Callable] | None = field(default=None, repr=False)  # train, eval

    def __post_init__(self):
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need {self.in_channels} values, got "
                             f"{len(self.mean)} and {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but {len(self.classes)} names")
        if self.streaming:
            if self.test_set is None or self.transforms is None or self.train_x is not None:
                raise ValueError("a streaming bundle needs train_set, test_set and transforms "
                                 "and no tensors")
            return
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x is None or y is None:
                raise ValueError(f"{split}_x and {split}_y are required without train_set")
            shape = (self.in_channels, self.image_size, self.image_size)
            if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"{split}_x must be uint8 (N, {', '.join(map(str, shape))}), "
                                 f"got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (len(x),) or y.device != x.device:
                raise ValueError(f"{split}_y must be int64 ({len(x)},) on {x.device}, got "
                                 f"{y.dtype} {tuple(y.shape)} on {y.device}")

    @property
    def streaming(self) -> bool:
        return self.train_set is not None

    @property
    def num_train(self) -> int:
        return len(self.train_set) if self.streaming else len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_set) if self.streaming else len(self.test_x)


def _torchvision():
    try:
        import torchvision
        from torchvision import datasets, transforms  # noqa: F401
    except Exception as e:  # ImportError, or a build for another torch failing at import
        raise RuntimeError(
            f"torchvision is required for ImageNet (JPEG decoding and resizing) but cannot be "
            f"imported ({type(e).__name__}: {_line(e)}); install the torchvision release built "
            f"for torch {torch.__version__.split('+')[0]} (pip install torchvision==<matching "
            f"version>, see pytorch.org); fashion-mnist, cifar10, cifar100 and synthetic do not "
            f"need it") from None
    return torchvision


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in os.scandir(folder) if d.is_dir())


def _imagenet(root: Path, subset):
    train, val = root / "train", root / "val"
    missing = [f"{d.name}/" for d in (train, val) if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet not found: expected class folders train/<class>/*.JPEG and val/<class>/* "
            f"in {root}; missing {', '.join(missing)} ({_NO_DOWNLOAD})")
    classes = _class_dirs(train)
    if not classes:
        raise FileNotFoundError(f"ImageNet: no class folders in {train}: expected "
                                f"train/<class>/*.JPEG")
    val_classes = _class_dirs(val)
    if val_classes != classes:
        odd = sorted(set(classes) ^ set(val_classes))
        raise ValueError(f"ImageNet: {val} has {len(val_classes)} class folders, {train} has "
                         f"{len(classes)}, {len(odd)} differ (e.g. {odd[0] if odd else '?'}): "
                         f"expected the same <class> folders in both")
    tv = _torchvision()
    T = tv.transforms
    train_set = tv.datasets.ImageFolder(str(train))
    test_set = tv.datasets.ImageFolder(str(val))
    if subset is not None:
        keep = stratified_indices(torch.as_tensor(train_set.targets), subset, len(classes))
        train_set = torch.utils.data.Subset(train_set, keep.tolist())
    transforms = (
        T.Compose([T.RandomResizedCrop(IMAGENET_CROP), T.RandomHorizontalFlip(),
                   T.PILToTensor()]),
        T.Compose([T.Resize(IMAGENET_RESIZE), T.CenterCrop(IMAGENET_CROP), T.PILToTensor()]),
    )
    spec = DATASETS["imagenet"]
    return DataBundle("imagenet", len(classes), 3, IMAGENET_CROP, spec.mean, spec.std, None,
                      tuple(classes), train_set=train_set, test_set=test_set,
                      transforms=transforms)


def load_dataset(name: str, root=None, *, device="cpu", subset: int | None = None,
                 seed: int = 0, **synthetic) -> DataBundle:
    """Load ``name`` (a key of :data:`DATASETS`) from ``root`` (default: the spec's folder).

    Tensor-path sets are held on ``device`` as uint8.  ``subset=N`` keeps a stratified N of the
    training images (:func:`stratified_indices`: the first ones of each class in file order, the
    same whatever the seed); the test set is kept whole.  ``seed`` and ``**synthetic`` (the
    keywords of :func:`make_synthetic`) apply to ``"synthetic"`` only, whose mean/std are
    computed from its generated training set."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if synthetic and name != "synthetic":
        raise ValueError(f"options {sorted(synthetic)} apply to 'synthetic' only")
    spec = DATASETS[name]
    folder = Path(root if root is not None else spec.root or ".").expanduser().absolute()
    if name == "imagenet":
        return _imagenet(folder, subset)
    mean, std = spec.mean, spec.std
    if name == "synthetic":
        (xtr, ytr), (xte, yte) = make_synthetic(seed=seed, **synthetic)
        mean, std = channel_stats(xtr)
        num_classes = synthetic.get("num_classes", make_synthetic.__kwdefaults__["num_classes"])
        classes = tuple(str(i) for i in range(num_classes))
        augment = Augment(xtr.shape[-1] // 8, False)
    else:
        if name == "fashion-mnist":
            (xtr, ytr), (xte, yte) = read_fashion_mnist(folder)
            xtr, xte = xtr[:, None], xte[:, None]
            classes = FASHION_CLASSES
        else:
            (xtr, ytr), (xte, yte), classes = read_cifar(folder, name)
        xtr, xte = torch.from_numpy(xtr), torch.from_numpy(xte)
        ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
        num_classes, augment = spec.num_classes, spec.augment
    if subset is not None:
        keep = stratified_indices(ytr, subset, num_classes)
        xtr, ytr = xtr[keep], ytr[keep]
    xtr, ytr, xte, yte = (t.contiguous().to(device) for t in (xtr, ytr, xte, yte))
    return DataBundle(name, num_classes, xtr.shape[1], xtr.shape[-1], tuple(mean), tuple(std),
                      augment, classes, xtr, ytr, xte, yte)


# --------------------------------------------------------------------------- loaders


def _batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    words = np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


class _EpochLoader:
    """Epoch order, sharding, position and state shared by both loaders."""

    def __init__(self, n, batch_size, *, shuffle, drop_last, seed, generator, rank, world_size,
                 mean, std, channels_last, device):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"the order generator must be on the CPU, got {generator.device}")
        shard_indices(0, rank, world_size)  # validates rank / world_size
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.device = channels_last, torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self._gen = None
        if shuffle:
            self._gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.epoch, self._position, self._open, self._epoch_rng = 0, 0, False, None
        m = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._shift, self._scale = -m / s, 1 / (255 * s)

    def _shard_size(self) -> int:
        kept = self.n - self.n % self.world_size if self.shuffle else self.n
        return len(range(self.rank, kept, self.world_size))

    def __len__(self) -> int:
        m = self._shard_size()
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def _open_epoch(self) -> torch.Tensor:
        if self._gen is not None:
            if self._open:  # re-entering an epoch already begun: redraw the same permutation
                self._gen.set_state(self._epoch_rng)
            else:
                self._epoch_rng = self._gen.get_state()
        self._open = True
        return shard_indices(self.n, self.rank, self.world_size, generator=self._gen,
                             even=self.shuffle)

    def _end_epoch(self):
        self.epoch, self._position, self._open = self.epoch + 1, 0, False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch (all of it unless resumed or re-entered mid-epoch;
        nothing if the state was saved after its last batch); then ``epoch`` advances."""
        return self._run(self._open_epoch())

    def set_epoch(self, epoch: int) -> None:
        """``DistributedSampler``-style hook: the next iteration serves epoch ``epoch``.

        The current epoch: nothing changes (a resumed position is kept).  A later one: the
        skipped epochs' permutations are drawn and discarded, so the order is an uninterrupted
        run's.  An earlier one is a ``ValueError`` (restore a ``state_dict`` instead)."""
        if not isinstance(epoch, int) or epoch < self.epoch:
            raise ValueError(f"cannot go back to epoch {epoch!r} from epoch {self.epoch}: "
                             f"load a state_dict saved then")
        while self.epoch < epoch:
            if not self._open:
                self._open_epoch()
            self._end_epoch()

    def _run(self, order):
        for b, (x, y) in enumerate(self._batches(order, self._position), self._position):
            x = torch.addcmul(self._shift, x.float(), self._scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._position = b + 1
            yield x, y
        self._end_epoch()

    def _batches(self, order, start):  # uint8 (B, C, H, W) and int64 (B,) on self.device
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Epoch, batches delivered in it, and the order generator's state at its start."""
        rng = None
        if self._gen is not None:
            rng = (self._epoch_rng if self._open else self._gen.get_state()).clone()
        return {"epoch": self.epoch, "position": self._position, "order_rng": rng,
                "n": self.n, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "batch_size", "shuffle", "drop_last", "world_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader "
                                 f"{getattr(self, key)!r}: resuming would change the batches")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"position {state['position']} outside [0, {len(self)}]")
        if self._gen is not None:
            self._gen.set_state(state["order_rng"])
        self.epoch, self._position, self._open = state["epoch"], state["position"], False


class TensorLoader(_EpochLoader):
    """Batches ``(x float32 normalised, y int64)`` from uint8 tensors ``x (N, C, H, W)``, ``y``.

    Shuffling (``shuffle``) from ``generator`` or a CPU generator seeded with ``seed``;
    ``augment`` (an :class:`Augment`, or ``None``) runs on ``device`` (default ``x``'s) with a
    generator re-seeded per batch from ``(seed, rank, epoch, batch)``.  ``rank``/``world_size``
    select this process's shard (:func:`shard_indices`, equal shards when shuffling).  Iterating
    yields the rest of the current epoch; ``state_dict``/``load_state_dict`` resume exactly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle=True,
                 drop_last=False, augment: Augment | None = None, mean=(0.0,), std=(1.0,),
                 seed=0, generator=None, rank=0, world_size=1, channels_last=False, device=None):
        if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (len(x),):
            raise ValueError(f"need uint8 x (N, C, H, W) and y (N,), got {x.dtype} "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if augment is not None and not isinstance(augment, Augment):
            raise ValueError(f"augment must be an Augment or None, got {augment!r}")
        super().__init__(len(x), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         generator=generator, rank=rank, world_size=world_size, mean=mean,
                         std=std, channels_last=channels_last,
                         device=x.device if device is None else device)
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1]:
            raise ValueError(f"mean and std need {x.shape[1]} values")
        self.x, self.y = x, y
        self.augment = augment if augment is not None and augment.active else None
        self._aug_gen = torch.Generator(device=self.device) if self.augment else None

    def _batches(self, order, start):
        order = order.to(self.x.device)
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = order[b * bs:(b + 1) * bs]
            x = self.x.index_select(0, idx).to(self.device, non_blocking=True)
            y = self.y.index_select(0, idx).to(self.device, non_blocking=True)
            if self.augment is not None:
                self._aug_gen.manual_seed(_batch_seed(self.seed, self.rank, self.epoch, b))
                x = random_crop_flip(x, self.augment, self._aug_gen)
            yield x, y


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return self.transform(img), label


class StreamLoader(_EpochLoader):
    """The streaming counterpart of :class:`TensorLoader` for a map-style dataset of
    ``(image, label)``: ``transform`` turns an image into uint8 ``(C, H, W)`` inside
    ``num_workers`` DataLoader workers; normalisation runs on ``device``.

    Same order, sharding and state as :class:`TensorLoader`.  A resumed epoch repeats the sample
    order exactly.  The random transforms draw from the DataLoader's per-worker generators,
    seeded from ``(seed, rank, epoch, first batch)``: reproducible for a fixed ``num_workers``
    but re-drawn on resume (with ``num_workers=0`` they use the global torch RNG)."""

    def __init__(self, dataset, transform: Callable, batch_size: int, *, shuffle=True,
                 drop_last=False, mean=(0.0,), std=(1.0,), seed=0, generator=None, rank=0,
                 world_size=1, channels_last=False, device="cpu", num_workers=None):
        super().__init__(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last,
                         seed=seed, generator=generator, rank=rank, world_size=world_size,
                         mean=mean, std=std, channels_last=channels_last, device=device)
        self.dataset = _Transformed(dataset, transform)
        self.num_workers = STREAM_WORKERS if num_workers is None else num_workers

    def _batches(self, order, start):
        rest = order[start * self.batch_size:].tolist()
        g = torch.Generator().manual_seed(_batch_seed(self.seed, self.rank, self.epoch, start))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=rest, drop_last=self.drop_last,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", generator=g)
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True),
                   torch.as_tensor(y).long().to(self.device, non_blocking=True))


def make_loader(bundle: DataBundle, split: str = "train", batch_size: int = 128, *,
                train: bool | None = None, augment: bool | Augment | None = None,
                drop_last: bool | None = None, seed: int = 0,
                generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                channels_last: bool = False, device=None, num_workers: int | None = None):
    """A loader over ``bundle``'s ``split`` (``"train"`` or ``"test"``).

    ``train`` (default: ``split == "train"``) turns on shuffling and is the default of
    ``augment`` (``True``: the bundle's recipe, ``False``: none, or an :class:`Augment`) and of
    ``drop_last``.  ``device`` defaults to where the bundle's tensors are (CPU when streaming).
    ``num_workers`` applies to streaming bundles only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train" if train is None else train
    augment = train if augment is None else augment
    drop_last = train if drop_last is None else drop_last
    common = dict(shuffle=train, drop_last=drop_last, mean=bundle.mean, std=bundle.std,
                  seed=seed, generator=generator, rank=rank, world_size=world_size,
                  channels_last=channels_last)
    if bundle.streaming:
        if not isinstance(augment, bool):
            raise ValueError("a streaming bundle takes augment=True/False (its own transforms)")
        dataset = bundle.train_set if split == "train" else bundle.test_set
        return StreamLoader(dataset, bundle.transforms[0 if augment else 1], batch_size,
                            device="cpu" if device is None else device, num_workers=num_workers,
                            **common)
    if num_workers is not None:
        raise ValueError("num_workers applies to streaming datasets only")
    if isinstance(augment, bool):
        augment = bundle.augment if augment else None
    x, y = (bundle.train_x, bundle.train_y) if split == "train" else (bundle.test_x,
                                                                       bundle.test_y)
    return TensorLoader(x, y, batch_size, augment=augment, device=device, **common)
