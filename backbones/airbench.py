"""The CIFAR-10 speedrun network (Keller Jordan's airbench, after hlb-CIFAR10 by Tysam&), not in the paper.

Source: K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv:2404.00498) and
https://github.com/KellerJordan/cifar10-airbench (``airbench94.py``), which builds on
https://github.com/tysam-code/hlb-CIFAR10. The network, as there:

* a frozen 2x2 *patch-whitening* conv (valid padding, with a trainable bias): its filters are the
  eigenvectors of the covariance of the training images' 2x2 patches, each scaled by
  ``1 / sqrt(eigenvalue + eps)``, and their negatives (``2 * in_chans * 4`` output channels), so its
  output is a whitened view of every patch. The weights come from data (``init_from_data``, called by
  the trainer with the first ``data_init_images`` training images before the first step);
* three blocks ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU`` (widths 64, 256, 256;
  ``pools`` can leave a block's max-pool out, keeping its input's resolution);
  ``whiten_from_data=False`` (an ablation) makes it an ordinary trained conv instead;
* a global max-pool and a linear classifier whose logits are scaled by ``logit_scale`` (1/9 there).

airbench's other network choices are options, off by default (the suite's BN and init): ``dirac_init``
(each 3x3 conv's first ``in_chs`` filters start as the identity, ``nn.init.dirac_``), ``bn_momentum``
(the running statistics' update weight in torch's convention: airbench's "momentum 0.6" is 0.4 here),
``bn_eps`` and ``bn_weight=False`` (BN's gamma frozen at 1, only beta trains). Left out: freezing the
whitening bias after 3 epochs. On Fashion-MNIST (28 px, 1 channel) the maps are 27, 13, 6, 3 px.

The feature contract: ``block1``..``block3`` at nominal strides 2, 4, 8 (the valid whitening conv
takes one pixel off, so a map is ``floor`` of the nominal size), not res2..res5: it is a classifier for
small images, not a detection/segmentation backbone.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ._base import Backbone, FeatureInfo, NormLayer, init_weights, resolve_norm
from ._registry import register_backbone


def patch_whitening_weights(images: Tensor, kernel_size: int, eps: float = 5e-4) -> Tensor:
    """Conv weights ``[2 * C * k * k, C, k, k]`` that whiten the ``k x k`` patches of ``images`` [N, C, H, W].

    As airbench's ``init_whitening_conv``: the eigenvectors of the patch covariance (uncentred,
    largest eigenvalue first), divided by ``sqrt(eigenvalue + eps)``, followed by their negatives.
    """
    n, c, _, _ = images.shape
    k = kernel_size
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    covariance = patches.T @ patches / patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # rows, largest first
    scaled = (eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).reshape(c * k * k, c, k, k)
    return torch.cat([scaled, -scaled]).float()


class ConvBlock(nn.Module):
    """``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU`` (airbench's ``ConvGroup``)."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: NormLayer, pool: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.bn1 = norm_layer(out_chs)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class AirbenchNet(Backbone):
    """airbench's network (see the module docstring); ``widths`` are the three blocks' channels."""

    # The trainer passes this many training images (normalised, before the first step) to init_from_data.
    data_init_images = 5000

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        pools: Sequence[bool] = (True, True, True),
        whiten_kernel: int = 2,
        whiten_eps: float = 5e-4,
        whiten_from_data: bool = True,
        logit_scale: float = 1 / 9,
        dirac_init: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        bn_weight: bool = True,
        output_stride: int = 32,
        zero_init_last: bool = False,
        norm_layer: Optional[NormLayer] = None,
        norm_eval: bool = False,
        init: Literal["xavier", "kaiming"] = "xavier",
    ):
        super().__init__(norm_eval=norm_eval)
        if output_stride != 32:
            raise ValueError("airbench has no dilated variant (output_stride must be 32); it is a classifier")
        if zero_init_last:
            raise ValueError("airbench has no residual blocks: zero_init_last (model.zero_init_last) does not apply")
        if len(widths) != 3 or len(pools) != 3:
            raise ValueError(f"airbench has three blocks: widths and pools need 3 values each, got {list(widths)} "
                             f"and {list(pools)}")
        norm_layer = resolve_norm(norm_layer)
        self.num_classes, self.whiten_eps, self.logit_scale = num_classes, whiten_eps, logit_scale
        whiten_width = 2 * in_chans * whiten_kernel**2
        self.whiten = nn.Conv2d(in_chans, whiten_width, whiten_kernel, bias=True)
        self.act0 = nn.GELU()
        inplanes, self.feature_info, stride = whiten_width, [], 1
        for i, (width, pool) in enumerate(zip(widths, pools)):
            self.add_module(f"layer{i + 1}", ConvBlock(inplanes, width, norm_layer, pool=bool(pool)))
            stride *= 2 if pool else 1
            self.feature_info.append(FeatureInfo(f"block{i + 1}", width, stride))
            inplanes = width
        self.num_features = inplanes
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.reset_classifier(num_classes)
        self.default_cfg = dict(input_size=(in_chans, 32, 32), mean=(0.5,) * in_chans, std=(0.25,) * in_chans)
        init_weights(self, init)
        for m in self.modules():
            if isinstance(m, ConvBlock):
                for conv in (m.conv1, m.conv2):
                    if dirac_init:  # airbench's partial identity init: filter i passes input channel i through
                        nn.init.dirac_(conv.weight.data[: conv.in_channels])
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum, m.eps = bn_momentum, bn_eps
                if m.weight is not None and not bn_weight:
                    m.weight.requires_grad_(False)
        if whiten_from_data:
            # Frozen from the start (the bias trains); set by init_from_data before the first step.
            self.whiten.weight.requires_grad_(False)
        else:  # the ablation: an ordinary trained 2x2 conv, initialised like the others
            self.data_init_images = 0

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Set the whitening filters from normalised training images ``[N, C, H, W]`` (``patch_whitening_weights``)."""
        weight = patch_whitening_weights(images, self.whiten.kernel_size[0], self.whiten_eps)
        self.whiten.weight.copy_(weight.to(self.whiten.weight.device))

    def stages(self) -> list[list[nn.Module]]:
        return [[self.whiten], [self.layer1], [self.layer2], [self.layer3]]

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.act0(self.whiten(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return super().forward_head(x) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[self.feature_info[-1].name])


@register_backbone
def airbench(**kwargs) -> AirbenchNet:
    """airbench's CIFAR-10 speedrun network (Jordan 2024; widths 64, 256, 256), not in the paper."""
    return AirbenchNet(**kwargs)
