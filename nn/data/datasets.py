"""What a dataset name means and how it is loaded: :data:`DATASETS`, :class:`DataBundle`,
:func:`load_dataset`, the seeded synthetic set and ImageNet's class folders.

Per-dataset recipe (:data:`DATASETS`, the one home of these defaults).  Mean/std are per channel
over the *training* set in [0, 1] (population std, ddof=0), computed once with
:func:`~nn.data.augment.channel_stats` and hard-coded; ImageNet keeps the usual constants of
pretrained models.

* Fashion-MNIST: pad 2 + flip.  Garments are scaled so their longest side fills the 28x28 frame,
  so every image has ink near its border and a wider pad would crop away part of a garment.
  Flipping is label-preserving (a mirrored shirt, bag or shoe is the same class; only footwear
  has a consistent catalogue orientation) and is common practice on this set.
* CIFAR-10/100: pad 4 + flip (the standard ResNet recipe).  Synthetic: pad ``size // 8``, no flip.
* ImageNet (streaming): RandomResizedCrop(224) + flip to train, Resize(256) + CenterCrop(224) to
  evaluate, decoded by torchvision (optional: only this dataset needs it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nn.checks import ConfigError
from nn.data.augment import Augment, channel_stats
from nn.data.formats import (CIFAR_ROOT, FASHION_CLASSES, FASHION_MNIST_ROOT, NO_DOWNLOAD,
                             error_line, read_cifar, read_fashion_mnist)
from nn.data.loaders import stratified_indices

__all__ = ["DatasetSpec", "DATASETS", "DataBundle", "make_synthetic", "load_dataset",
           "IMAGENET_RESIZE", "IMAGENET_CROP"]

IMAGENET_RESIZE, IMAGENET_CROP = 256, 224


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
                                 Augment(2, True), FASHION_MNIST_ROOT),
    "cifar10": DatasetSpec("CIFAR-10", 10, 3, 32, (0.49139968, 0.48215841, 0.44653091),
                           (0.24703223, 0.24348513, 0.26158784), Augment(4, True), CIFAR_ROOT),
    "cifar100": DatasetSpec("CIFAR-100", 100, 3, 32, (0.50707516, 0.48654887, 0.44091784),
                            (0.26733429, 0.25643846, 0.27615047), Augment(4, True), CIFAR_ROOT),
    "imagenet": DatasetSpec("ImageNet", None, 3, IMAGENET_CROP, (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), None, "data/imagenet"),
    "synthetic": DatasetSpec("synthetic", None, 3, None, None, None, None, None),
}


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


# --------------------------------------------------------------------------- synthetic


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def make_synthetic(n_train: int = 2048, n_test: int = 512, *, image_size: int = 16,
                   channels: int = 3, num_classes: int = 4, noise: float = 0.25, seed: int = 0):
    """A seeded, learnable set: ``((x_train, y_train), (x_test, y_test))`` torch tensors,
    ``x`` uint8 ``(N, channels, size, size)``, labels balanced and shuffled.

    Class ``k`` has a smooth template ``T_k`` (uniform 4x4 values per channel, bilinearly
    upsampled: features a few pixels wide survive small crops); an image is
    ``clip(T_y + noise * N(0, 1), 0, 1)`` in steps of 1/255."""
    for label, v, lo in (("n_train", n_train, 1), ("n_test", n_test, 1),
                         ("image_size", image_size, 1), ("channels", channels, 1),
                         ("num_classes", num_classes, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{label} must be an int >= {lo}, got {v!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    need = 9 * max(n_train, n_test) * channels * image_size ** 2  # float32 draws + uint8 result
    have = _memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"a synthetic set of {max(n_train, n_test)} images of {channels}x"
                         f"{image_size}x{image_size} needs about {need / 2**30:.3g} GiB while it "
                         f"is drawn, more than this machine's {have / 2**30:.3g} GiB: ask for "
                         f"fewer or smaller images")
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(low, size=(image_size, image_size),
                                                mode="bilinear", align_corners=False)

    def split(n):
        y = torch.randperm(n, generator=g) % num_classes
        x = templates[y] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8), y

    return split(n_train), split(n_test)


# --------------------------------------------------------------------------- ImageNet


class _NoTorchvision(ConfigError, RuntimeError):
    """ImageNet needs torchvision and it cannot be imported: a run that cannot start (one line
    from ``python -m nn``); a ``RuntimeError`` too, as it always was."""


def _torchvision():
    try:
        import torchvision
        from torchvision import datasets, transforms  # noqa: F401
    except Exception as e:  # ImportError, or a build for another torch failing at import
        raise _NoTorchvision(
            f"torchvision is required for ImageNet (JPEG decoding and resizing) but cannot be "
            f"imported ({type(e).__name__}: {error_line(e)}); install the torchvision release "
            f"built for torch {torch.__version__.split('+')[0]} (pip install "
            f"torchvision==<matching version>, see pytorch.org); fashion-mnist, cifar10, "
            f"cifar100 and synthetic do not need it") from None
    return torchvision


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in os.scandir(folder) if d.is_dir())


def _imagenet(root: Path, subset):
    train, val = root / "train", root / "val"
    missing = [f"{d.name}/" for d in (train, val) if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet not found: expected class folders train/<class>/*.JPEG and val/<class>/* "
            f"in {root}; missing {', '.join(missing)} ({NO_DOWNLOAD})")
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


# --------------------------------------------------------------------------- entry point


def load_dataset(name: str, root=None, *, device="cpu", subset: int | None = None,
                 seed: int = 0, **synthetic) -> DataBundle:
    """Load ``name`` (a key of :data:`DATASETS`) from ``root`` (default: the spec's folder).

    Tensor-path sets are held on ``device`` as uint8.  ``subset=N`` keeps a stratified N of the
    training images (:func:`~nn.data.loaders.stratified_indices`: the first ones of each class
    in file order, the same whatever the seed); the test set is kept whole.  ``seed`` and
    ``**synthetic`` (the keywords of :func:`make_synthetic`) apply to ``"synthetic"`` only,
    whose mean/std are computed from its generated training set."""
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
    for split, y in (("training", ytr), ("test", yte)):
        if len(y) == 0:
            raise ValueError(f"the {split} set of {spec.title} in {folder} holds no images: "
                             f"expected at least one")
    if subset is not None:
        keep = stratified_indices(ytr, subset, num_classes)
        xtr, ytr = xtr[keep], ytr[keep]
    xtr, ytr, xte, yte = (t.contiguous().to(device) for t in (xtr, ytr, xte, yte))
    return DataBundle(name, num_classes, xtr.shape[1], xtr.shape[-1], tuple(mean), tuple(std),
                      augment, classes, xtr, ytr, xte, yte)
