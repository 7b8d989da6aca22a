"""Readers of the on-disk formats: IDX (Fashion-MNIST) and the CIFAR-10/100 python pickles.

Both return uint8 numpy arrays and raise a one-line error naming the file and what was expected:
``FileNotFoundError`` when files are missing (saying where they are expected: nothing is ever
downloaded), ``ValueError`` when a file is malformed.  CIFAR pickles are read by an unpickler
that builds only numpy arrays and plain containers, so a CIFAR file cannot run code.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["read_idx", "read_fashion_mnist", "read_cifar", "FASHION_CLASSES",
           "FASHION_MNIST_ROOT", "CIFAR_ROOT"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the four IDX files."""
CIFAR_ROOT = "data"
"""Default parent folder of the extracted CIFAR pickle folders."""
NO_DOWNLOAD = "pass root= / --data-dir; nothing is downloaded"

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def error_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when the message is empty)."""
    return " ".join(str(e).split()) or type(e).__name__


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
            raise ValueError(f"{path}: corrupt or truncated gzip data ({error_line(e)}): "
                             f"expected a gzip-compressed IDX file") from None
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

    ``root`` defaults to :data:`FASHION_MNIST_ROOT`.  Each of the four files may be
    ``<name>.gz`` (as shipped) or uncompressed ``<name>``."""
    root = Path(root if root is not None else FASHION_MNIST_ROOT)
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
            f"dataset-fashion-mnist or {NO_DOWNLOAD})")
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
        raise ValueError(f"{path}: unreadable pickle ({error_line(e)}): expected "
                         f"{expected}") from None
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

    ``root`` (default :data:`CIFAR_ROOT`) is the extracted folder (``cifar-10-batches-py`` /
    ``cifar-100-python``) or its parent.  CIFAR-100 uses the 100 fine labels.  The class names
    come from the meta file when it is there.  Pickles are loaded with ``encoding="bytes"`` by
    an unpickler that only builds numpy arrays and plain containers."""
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {name!r}")
    spec = _CIFAR[name]
    root = Path(root if root is not None else CIFAR_ROOT).expanduser().absolute()
    need = spec.train + spec.test
    folder = next((d for d in (root / spec.folder, root)
                   if all((d / f).is_file() for f in need)), None)
    if folder is None:
        d = root / spec.folder if (root / spec.folder).is_dir() else root
        missing = [f for f in need if not (d / f).is_file()]
        raise FileNotFoundError(
            f"{spec.title} not found: expected {', '.join(need)} in {root / spec.folder} or "
            f"{root}; missing {', '.join(missing)} in {d} (extract {spec.archive} there or "
            f"{NO_DOWNLOAD})")
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
