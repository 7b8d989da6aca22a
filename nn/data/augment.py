"""Batched tensor augmentation and normalisation of uint8 images ``(B, C, H, W)``.

The tensor path's augmentation is a random crop after zero padding plus a horizontal flip,
applied to a whole batch with one gather (:func:`crop_flip`: no per-image Python), and
normalisation is one fused multiply-add (:func:`normalize`).  :func:`channel_stats` gives the
exact per-channel mean/std that :data:`nn.data.DATASETS` hard-codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Augment", "channel_stats", "normalize", "crop_flip", "random_crop_flip"]


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
