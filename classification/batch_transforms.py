"""The §2.1 augmentation applied to a whole uint8 batch on the training device.

For datasets that fit in memory as one uint8 tensor (Fashion-MNIST), per-sample PIL/v2 transforms in
DataLoader workers cost more CPU than the network itself on small images; here the same operations
run vectorised on the batch (airbench-style), on the GPU for GPU users. Semantics follow torchvision:

* ``RandomResizedCrop``: the same sampling of area/ratio (10 tries, then the centre-crop fallback),
  then bilinear resampling by two gathers per axis; this equals ``resized_crop(antialias=False)``
  (tested) and ``antialias=True`` whenever the crop is upsampled, which is the case this
  pipeline is for (small images). Large images use the per-sample pipeline (``data.pipeline=samples``).
* ``data.translate`` (not in the paper; airbench's ``batch_crop``): each image shifted by a random
  offset in ``[-t, t]`` px per axis, reflect-padded, as ``v2.RandomCrop(size, padding=t,
  padding_mode="reflect")`` per image.
* flip, brightness, contrast, saturation: per-image factors; the order of the three colour ops is
  drawn once per batch (torchvision draws it per image).
* PCA lighting: ``transforms.Lighting`` is already batched.
* random erasing (``data.random_erase``, not in the paper): ``transforms.random_erase``, after normalisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from runtime.config import ConfigError

from .config import DataConfig
from .transforms import Lighting, check_erasing, random_erase


def random_resized_crop_params(n: int, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], device=None, tries: int = 10) -> Tensor:
    """``[n, 4]`` boxes ``(top, left, h, w)`` drawn as ``torchvision RandomResizedCrop.get_params``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio, device=device))
    target_area = area * torch.empty(n, tries, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, tries, device=device).uniform_(log_ratio[0].item(), log_ratio[1].item()))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    # Fallback of torchvision: the largest centre crop whose ratio is clamped into the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    found = ok.any(1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def _source_index(offset: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear source taps of ``F.interpolate(align_corners=False)`` inside a crop, per image.

    Output pixel ``u`` reads ``src = (u + 0.5) * length / size - 0.5`` (clamped at 0) of the crop;
    the taps ``floor(src)`` and ``floor(src) + 1`` are clamped to the crop, as interpolate clamps to the
    image it is given (so pixels outside the crop never leak in).
    """
    u = torch.arange(size, device=offset.device, dtype=torch.float32)
    src = ((u[None] + 0.5) * (length[:, None] / size) - 0.5).clamp_(min=0)
    i0 = src.floor()
    frac = src - i0
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    return (offset[:, None] + i0).long(), (offset[:, None] + i1).long(), frac


def resized_crop(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``boxes`` (top, left, h, w) from float ``images`` [N, C, H, W] and resize to ``size`` x ``size``.

    Separable bilinear interpolation with torchvision's pixel-centre convention (no antialias).
    """
    n, c, height, width = images.shape
    top, left, h, w = boxes.float().unbind(1)
    y0, y1, fy = _source_index(top, h, size)
    x0, x1, fx = _source_index(left, w, size)

    def rows(idx: Tensor) -> Tensor:  # [N, C, size, W]
        return images.gather(2, idx[:, None, :, None].expand(n, c, size, width))

    def cols(x: Tensor, idx: Tensor) -> Tensor:  # [N, C, size, size]
        return x.gather(3, idx[:, None, None, :].expand(n, c, size, size))

    fy = fy[:, None, :, None].to(images.dtype)
    fx = fx[:, None, None, :].to(images.dtype)
    r = rows(y0) * (1 - fy) + rows(y1) * fy
    return cols(r, x0) * (1 - fx) + cols(r, x1) * fx


def translate(images: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Shift each image of ``images`` [N, C, H, W] by ``offsets`` [N, 2] (dy, dx in ``[-pad, pad]``).

    Output pixel ``(i, j)`` of image ``n`` is pixel ``(i + dy, j + dx)`` of the image reflect-padded by
    ``pad``: the crop at ``(pad + dy, pad + dx)`` of the padded image, what ``RandomCrop`` with
    ``padding=pad, padding_mode="reflect"`` takes. Two gathers, no per-image Python.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    rows = (offsets[:, 0, None] + pad + torch.arange(h, device=images.device)).long()  # [N, H]
    cols = (offsets[:, 1, None] + pad + torch.arange(w, device=images.device)).long()  # [N, W]
    x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's rgb_to_grayscale weights


CPU_CHUNK_BYTES = 4 << 20  # BatchAugment on a CPU: float32 bytes per chunk of the batch


class BatchAugment(nn.Module):
    """uint8 ``[N, C, H, W]`` batch -> normalised float batch, with the §2.1 training augmentation
    (``train=True``) or resize + centre crop (``train=False``). ``C`` is expanded to ``in_chans``.

    ``geometry=False`` (``data.pipeline=hybrid``): the batch was cropped, flipped (and translated) image by image
    in the DataLoader workers (``transforms.train_transform(colour=False)``, ``val_transform(normalize=False)``);
    only the colour jitter, PCA lighting and normalisation run here."""

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float], in_chans: int, train: bool,
                 geometry: bool = True):
        super().__init__()
        if train and cfg.hue:
            raise ConfigError(f"data.hue > 0 is not supported by the batched colour jitter (data.pipeline="
                             f"{cfg.pipeline}); use data.pipeline=samples")
        self.cfg, self.in_chans, self.train_mode, self.geometry = cfg, in_chans, train, geometry
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.lighting = Lighting(cfg.lighting) if train and cfg.lighting > 0 else None
        if self.lighting is not None and in_chans != 3:
            raise ConfigError("data.lighting > 0 needs RGB input (model.in_chans=3); set data.lighting=0")
        if train and cfg.random_erase > 0:
            check_erasing(cfg.erase_area, cfg.erase_aspect, cfg.erase_mode)  # when built; draws nothing

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.device.type == "cpu" and images.shape[0] > 1:
            # On a CPU each step is a pass over memory: in chunks that stay in the cache (a batch of 64 224 px
            # images in float32 is 38 MB a pass; chunks of 4 MB took a fifth of the time). Draws per chunk.
            per_image = images[0].numel() * 4 * max(self.in_chans, images.shape[1]) // images.shape[1]
            chunk = max(1, CPU_CHUNK_BYTES // per_image)
            if images.shape[0] > chunk:
                return torch.cat([self._forward(part) for part in images.split(chunk)])
        return self._forward(images)

    def _forward(self, images: Tensor) -> Tensor:
        x = images.float().div_(255)
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ConfigError(f"cannot turn {x.shape[1]}-channel images into model.in_chans={self.in_chans}")
            x = x.expand(-1, self.in_chans, -1, -1)
        x = self._train(x) if self.train_mode else self._val(x)
        x = (x - self.mean) / self.std
        if self.train_mode and self.cfg.random_erase > 0:  # after normalisation, as timm (not in the paper)
            c = self.cfg
            x = random_erase(x, c.random_erase, c.erase_area, c.erase_aspect, c.erase_mode)
        return x

    def _val(self, x: Tensor) -> Tensor:
        c = self.cfg
        if not self.geometry:
            return x
        if min(x.shape[-2:]) != c.val_resize:
            h, w = x.shape[-2:]
            scale = c.val_resize / min(h, w)
            size = (c.val_resize, int(w * scale)) if h <= w else (int(h * scale), c.val_resize)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        h, w = x.shape[-2:]
        top, left = int(round((h - c.val_crop) / 2.0)), int(round((w - c.val_crop) / 2.0))
        return x[..., top : top + c.val_crop, left : left + c.val_crop]

    def _train(self, x: Tensor) -> Tensor:
        c = self.cfg
        if self.geometry:
            x = self._geometry(x)
        ops = [op for op, strength in ((self._brightness, c.brightness), (self._contrast, c.contrast),
                                       (self._saturation, c.saturation)) if strength > 0]
        for i in torch.randperm(len(ops)).tolist():
            x = ops[i](x)
        if self.lighting is not None:
            x = self.lighting(x)
        return x

    def _geometry(self, x: Tensor) -> Tensor:
        c = self.cfg
        n = x.shape[0]
        if not (c.min_area >= 1 and c.max_area >= 1 and x.shape[-2] == x.shape[-1] == c.img_size):
            # (area 100% of a square image at its own size: every draw is the whole image, the identity)
            boxes = random_resized_crop_params(n, x.shape[-2], x.shape[-1], (c.min_area, c.max_area),
                                               (3 / 4, 4 / 3), device=x.device)
            x = resized_crop(x, boxes, c.img_size)
        if c.hflip > 0:
            flip = torch.rand(n, device=x.device) < c.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if c.translate > 0:
            x = translate(x, torch.randint(-c.translate, c.translate + 1, (n, 2), device=x.device), c.translate)
        return x

    @staticmethod
    def _factors(n: int, strength: float, device) -> Tensor:
        return torch.empty(n, 1, 1, 1, device=device).uniform_(max(0.0, 1 - strength), 1 + strength)

    def _brightness(self, x: Tensor) -> Tensor:
        return (x * self._factors(x.shape[0], self.cfg.brightness, x.device)).clamp_(0, 1)

    def _contrast(self, x: Tensor) -> Tensor:
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        f = self._factors(x.shape[0], self.cfg.contrast, x.device)
        return (f * x + (1 - f) * mean).clamp_(0, 1)

    def _saturation(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # a grayscale image has no saturation to change (torchvision: identity)
            return x
        f = self._factors(x.shape[0], self.cfg.saturation, x.device)
        return (f * x + (1 - f) * _grayscale(x)).clamp_(0, 1)
