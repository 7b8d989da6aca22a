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

Modules: :mod:`~nn.data.formats` (IDX and CIFAR-pickle readers), :mod:`~nn.data.augment`
(crop/flip, normalisation, channel statistics), :mod:`~nn.data.datasets` (the per-dataset
recipe :data:`DATASETS`, :class:`DataBundle`, :func:`load_dataset`), :mod:`~nn.data.loaders`
(order, sharding and exact resume).
"""

from nn.data.augment import Augment, channel_stats, crop_flip, normalize, random_crop_flip
from nn.data.datasets import DATASETS, DataBundle, DatasetSpec, load_dataset, make_synthetic
from nn.data.formats import read_cifar, read_fashion_mnist, read_idx
from nn.data.loaders import (StreamLoader, TensorLoader, make_loader, shard_indices,
                             stratified_indices)

__all__ = [
    "Augment", "DatasetSpec", "DATASETS", "DataBundle", "load_dataset", "make_loader",
    "TensorLoader", "StreamLoader", "read_idx", "read_fashion_mnist", "read_cifar",
    "make_synthetic", "channel_stats", "normalize", "crop_flip", "random_crop_flip",
    "shard_indices", "stratified_indices",
]
