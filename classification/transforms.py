"""Image transforms of the paper's baseline (§2.1), built from ``torchvision.transforms.v2``.

Only the AlexNet PCA lighting noise is written here: torchvision has no such transform.
All pipelines take PIL images (any mode, e.g. Fashion-MNIST's ``'L'``) or uint8 ``(C, H, W)``
tensors and return float32 ``(3, H, W)`` tensors normalized with the given mean/std (0-1 scale), or, for
``data.pipeline=hybrid``, the geometrically augmented uint8 image (colour and normalisation follow per batch).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from runtime.config import ConfigError

from .config import DataConfig

# Eigen-decomposition of the ImageNet RGB pixel covariance (0-1 scale), as used by AlexNet,
# fb.resnet.torch and GluonCV (which store the eigenvalues on the 0-255 scale: 55.46, 4.794, 1.148).
IMAGENET_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(nn.Module):
    """AlexNet-style PCA lighting noise on float RGB images in [0, 1].

    For each image, ``alpha ~ N(0, std^2)`` is drawn per principal component and the same RGB
    offset ``eigvec @ (alpha * eigval)`` is added to every pixel. Accepts ``(3, H, W)`` or batched
    ``(..., 3, H, W)`` tensors (one alpha per image) and keeps the ``tv_tensors.Image`` type, so it
    composes with ``v2.Compose``. The result is not clamped, as in GluonCV and fb.resnet.torch.
    """

    def __init__(
        self,
        std: float = 0.1,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
    ) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"Lighting std must be >= 0, got {std}")
        self.std = float(std)
        # Buffers, not parameters: fixed statistics that follow .to(device).
        self.register_buffer("eigval", torch.as_tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.as_tensor(eigvec, dtype=torch.float32), persistent=False)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ValueError(f"Lighting needs eigval (3,) and eigvec (3, 3), got {tuple(self.eigval.shape)} "
                             f"and {tuple(self.eigvec.shape)}")

    def forward(self, image: Tensor) -> Tensor:
        if self.std == 0:
            return image
        if image.ndim < 3 or image.shape[-3] != 3:
            raise ValueError(f"Lighting needs RGB images of shape (..., 3, H, W), got {tuple(image.shape)}; "
                             "convert grayscale with v2.RGB() first or set data.lighting=0")
        if not image.is_floating_point():
            raise TypeError(f"Lighting needs a float image in [0, 1], got {image.dtype}; "
                            "put v2.ToDtype(torch.float32, scale=True) before it")
        alpha = torch.randn(*image.shape[:-3], 3, device=self.eigval.device) * self.std
        offset = (alpha * self.eigval) @ self.eigvec.T  # (..., 3): eigvec @ (alpha * eigval) per image
        out = image.as_subclass(Tensor) + offset.to(image)[..., :, None, None]
        return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.TVTensor) else out

    def extra_repr(self) -> str:
        return f"std={self.std}"


ERASE_MODES = ("const", "rand", "pixel")


def check_erasing(area: Sequence[float], aspect: float, mode: str = "pixel") -> None:
    """The random-erasing arguments, a ``ConfigError`` naming the key (draws nothing from the RNG: the pipelines
    call it when they are built, before the model's initialisation)."""
    if len(area) != 2 or not 0 < float(area[0]) <= float(area[1]) <= 1:
        raise ConfigError(f"data.erase_area must be [min, max] with 0 < min <= max <= 1, got {list(area)}")
    if not 0 < aspect <= 1:
        raise ConfigError(f"data.erase_aspect must be in (0, 1] (ratios from it to its inverse), got {aspect}")
    if mode not in ERASE_MODES:
        raise ConfigError(f"data.erase_mode must be one of {', '.join(ERASE_MODES)}, got {mode!r}")


def erase_boxes(n: int, height: int, width: int, area: Sequence[float], aspect: float, device=None,
                attempts: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random-erasing rectangles of ``n`` images, timm's ``RandomErasing`` sampling (count 1) vectorised: up to
    ``attempts`` draws of an area ``U(area) * H * W`` and an aspect ratio log-uniform in ``[aspect, 1/aspect]``,
    ``h = round(sqrt(area * ratio))``, ``w = round(sqrt(area / ratio))``; the first draw with ``h < H`` and
    ``w < W`` is placed uniformly (``top`` in ``[0, H - h]``). Returns ``top, left, h, w`` and ``found`` (no draw
    fitted: that image is not erased), each ``[n]``. The arguments are ``check_erasing``'s."""
    target = torch.empty(n, attempts, device=device).uniform_(float(area[0]), float(area[1])) * (height * width)
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(aspect), -math.log(aspect))
    ratio = log_r.exp()
    h = (target * ratio).sqrt().round().long()
    w = (target / ratio).sqrt().round().long()
    fits = (h < height) & (w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first draw that fits (0 if none: see ``found``)
    h, w, found = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), fits.any(dim=1)
    top = (torch.rand(n, device=device) * (height - h + 1)).long().clamp_(0, height - 1)
    left = (torch.rand(n, device=device) * (width - w + 1)).long().clamp_(0, width - 1)
    return top, left, h, w, found


def random_erase(images: Tensor, p: float, area: Sequence[float], aspect: float, mode: str) -> Tensor:
    """Random erasing of a normalised float batch ``[N, C, H, W]`` (timm's ``RandomErasing``, count 1): each image
    with probability ``p`` gets one ``erase_boxes`` rectangle filled with 0 (``"const"``: the mean colour), one
    N(0, 1) value per channel (``"rand"``) or N(0, 1) per pixel (``"pixel"``). Returns a new tensor."""
    check_erasing(area, aspect, mode)
    n, c, height, width = images.shape
    top, left, h, w, found = erase_boxes(n, height, width, area, aspect, images.device)
    erase = found & (torch.rand(n, device=images.device) < p)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside = (((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :] & erase[:, None, None])
    if mode == "const":
        fill = images.new_zeros(())
    elif mode == "rand":
        fill = torch.randn(n, c, 1, 1, device=images.device, dtype=images.dtype)
    else:  # "pixel"
        fill = torch.randn_like(images)
    return torch.where(inside[:, None], fill, images)


class RandomErasing(nn.Module):
    """Per-image random erasing (``random_erase``) of a normalised float ``(C, H, W)`` image, last in the
    ``data.pipeline=samples`` training transform; the batched pipelines apply ``random_erase`` to the batch."""

    def __init__(self, p: float, area: Sequence[float] = (0.02, 1 / 3), aspect: float = 0.3, mode: str = "pixel"):
        super().__init__()
        self.p, self.area, self.aspect, self.mode = float(p), tuple(area), float(aspect), mode
        check_erasing(self.area, self.aspect, mode)  # the arguments' errors when the pipeline is built

    def forward(self, image: Tensor) -> Tensor:
        out = random_erase(image.as_subclass(Tensor)[None], self.p, self.area, self.aspect, self.mode)[0]
        return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.TVTensor) else out

    def extra_repr(self) -> str:
        return f"p={self.p}, area={self.area}, aspect={self.aspect}, mode={self.mode!r}"


def _to_image(in_chans: int) -> list[nn.Module]:
    # Work on tensors from the first step so PIL and tensor inputs take the same code path; the
    # channel count follows the backbone: grayscale becomes 3 identical channels for a 3-channel
    # network, and stays 1 channel (no wasted work) for a 1-channel one.
    if in_chans not in (1, 3):
        raise ConfigError(f"image transforms support 1 or 3 input channels, got model.in_chans={in_chans}")
    return [v2.ToImage(), v2.RGB() if in_chans == 3 else v2.Grayscale(1)]


def _to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float], in_chans: int = 3,
                    colour: bool = True) -> v2.Compose:
    """Training augmentation of §2.1: random resized crop, flip, colour jitter, PCA lighting, normalize.

    ``mean``/``std`` are per-channel on the 0-1 scale. Ops whose strength is 0 are left out. ``colour=False``
    (``data.pipeline=hybrid``): the geometric steps only (crop, flip, translate), returning the uint8 image;
    ``batch_transforms.BatchAugment(geometry=False)`` applies the rest to the batch on the device. Random
    erasing (``data.random_erase``, not in the paper) comes last, on the normalised image.
    """
    ops: list[nn.Module] = [
        *_to_image(in_chans),
        v2.RandomResizedCrop(cfg.img_size, scale=(cfg.min_area, cfg.max_area), ratio=(3 / 4, 4 / 3),
                             antialias=True),
    ]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.translate > 0:  # not in the paper (airbench): a shift of up to `translate` px, reflect-padded
        ops.append(v2.RandomCrop(cfg.img_size, padding=cfg.translate, padding_mode="reflect"))
    if not colour:
        return v2.Compose(ops)
    # The paper scales hue, saturation and brightness by U[0.6, 1.4]; GluonCV's reference recipe
    # (the one its ImageNet numbers come from) jitters brightness, contrast and saturation by 0.4 and
    # leaves hue alone, hence the config defaults. torchvision's hue is an additive shift in
    # [-h, h] of the colour circle, not a factor, so "hue x U[0.6, 1.4]" has no exact equivalent.
    # Like fb.resnet.torch, ColorJitter applies the enabled ops in random order.
    if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        ops.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None,
                                  saturation=cfg.saturation or None, hue=cfg.hue or None))
    ops.append(v2.ToDtype(torch.float32, scale=True))  # Lighting works on the 0-1 float scale
    if cfg.lighting > 0:
        if in_chans != 3:
            raise ConfigError(f"data.lighting={cfg.lighting}: PCA lighting needs RGB input (model.in_chans=3); "
                             "set data.lighting=0 for grayscale")
        ops.append(Lighting(cfg.lighting))
    ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    if cfg.random_erase > 0:  # not in the paper (timm's --reprob): after normalisation, as timm
        ops.append(RandomErasing(cfg.random_erase, cfg.erase_area, cfg.erase_aspect, cfg.erase_mode))
    return v2.Compose(ops)


def val_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float], in_chans: int = 3,
                  normalize: bool = True) -> v2.Compose:
    """Validation pipeline: resize the short side to ``val_resize``, center crop ``val_crop``, normalize
    (``normalize=False``, ``data.pipeline=hybrid``: the uint8 crop, normalised on the device)."""
    return v2.Compose([
        *_to_image(in_chans),
        v2.Resize(cfg.val_resize, antialias=True),
        v2.CenterCrop(cfg.val_crop),
        *(_to_normalized_float(mean, std) if normalize else []),
    ])
