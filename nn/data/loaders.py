"""Seedable, resumable, shardable loaders: :class:`TensorLoader` (a dataset held on the device
as uint8 tensors) and :class:`StreamLoader` (a map-style dataset decoded in DataLoader workers),
both yielding ``x`` float32 normalised ``(B, C, H, W)`` and ``y`` int64.

Shuffling, sharding and resuming: epoch ``e``'s order is one ``randperm`` drawn from a CPU
``torch.Generator`` (same seed on every rank); rank ``r`` of ``w`` takes ``order[r::w]``
(:func:`shard_indices`).  ``state_dict()`` stores the generator state at the start of the
current epoch and the batches already delivered, so a restored loader redraws the same
permutation and continues with the next batch.  Augmentation draws come from a generator
re-seeded per batch from ``(seed, rank, epoch, batch)``, so a resumed run also repeats the exact
crops and flips (tensor path), whichever rank saved the state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from nn.checks import ConfigError
from nn.data.augment import Augment, random_crop_flip

if TYPE_CHECKING:
    from nn.data.datasets import DataBundle

__all__ = ["TensorLoader", "StreamLoader", "make_loader", "shard_indices", "stratified_indices",
           "STREAM_WORKERS"]

STREAM_WORKERS = min(8, os.cpu_count() or 1)
"""Default DataLoader workers for the streaming (ImageNet) path."""


# --------------------------------------------------------------------------- indices


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
    ``n mod K`` classes), returned in file order: a balanced, seed-free subset (``n >= K``:
    every class is in it)."""
    y = labels.cpu().long()
    if not isinstance(n, int) or isinstance(n, bool) or not num_classes <= n <= len(y):
        raise ValueError(f"subset must be an int in [{num_classes}, {len(y)}] (every one of the "
                         f"{num_classes} classes at least once, at most the {len(y)} training "
                         f"images), got {n!r}")
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
        if drop_last and len(self) == 0:
            per = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(f"batch size {batch_size}{per} is larger than the "
                              f"{self._shard_size()} images to draw from{per}: with the last "
                              f"partial batch dropped an epoch would have no step; lower the "
                              f"batch size (--batch-size) or train on more images")

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
