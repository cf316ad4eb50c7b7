"""Losses and mixup of the refined training recipe (He et al. 2019, §5.2-§5.4).

Targets are probability vectors throughout: labels are smoothed first (``smooth_labels``), then mixed
(``mixup``), then scored (``soft_cross_entropy`` / ``distillation_loss``), the order GluonCV uses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["smooth_labels", "soft_cross_entropy", "mixup", "distillation_loss", "ClassificationLoss"]


def smooth_labels(labels: Tensor, num_classes: int, eps: float) -> Tensor:
    """Label-smoothed targets of the paper: ``q_i = 1 - eps`` if ``i == y`` else ``eps / (K - 1)``.

    This is not torch's ``label_smoothing`` (``eps / K`` on every class); the two agree for
    ``eps_torch = eps * K / (K - 1)``. ``eps = 0`` gives one-hot vectors. Returns float32 ``[..., K]``.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"smooth_labels: labels must be an integer tensor of class indices, got {labels.dtype}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"smooth_labels: eps must be in [0, 1), got {eps} (train.label_smoothing)")
    if eps > 0 and num_classes < 2:
        raise ValueError(f"smooth_labels: label smoothing needs num_classes >= 2, got {num_classes}")
    one_hot = F.one_hot(labels, num_classes).bool()
    if eps == 0:
        return one_hot.float()
    # torch.where keeps 1 - eps and eps / (K - 1) exact instead of rounding through a blend.
    return torch.where(one_hot, 1.0 - eps, eps / (num_classes - 1)).float()


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_i q_i log softmax(z)_i``, computed in float32 or wider.

    Half-precision inputs are cast up (never down: float64 stays float64): log-softmax over many
    classes loses too much in fp16/bf16.
    """
    if logits.shape != target_probs.shape:
        raise ValueError(f"soft_cross_entropy: logits shape {tuple(logits.shape)} != target shape "
                         f"{tuple(target_probs.shape)}; pass class probabilities [N, K] (see smooth_labels)")
    dtype = torch.promote_types(torch.promote_types(logits.dtype, target_probs.dtype), torch.float32)
    log_probs = F.log_softmax(logits.to(dtype), dim=-1)
    q = target_probs.to(dtype)
    # 0 * log 0 = 0: a class with no target mass adds nothing, even at a -inf logit (F.cross_entropy's convention)
    return -torch.where(q > 0, q * log_probs, torch.zeros((), dtype=dtype, device=q.device)).sum(dim=-1).mean()


def _sample_beta(alpha: float, generator: Optional[torch.Generator]) -> float:
    """One draw of Beta(alpha, alpha) from ``generator`` (a CPU generator) or torch's global CPU RNG."""
    concentration = torch.tensor([alpha, alpha], dtype=torch.float64)
    # torch.distributions.Beta samples through this very op (Beta -> Dirichlet -> _sample_dirichlet) but
    # offers no generator argument; calling the op directly is the only torch sampler that takes one.
    # With generator=None the draw equals Beta(alpha, alpha).sample() (a test pins this).
    return torch._sample_dirichlet(concentration, generator=generator)[0].item()


def mixup(
    images: Tensor, target_probs: Tensor, alpha: float, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, float]:
    """Mix each example with its mirror in the batch: ``x = lam x_i + (1 - lam) x_{n-1-i}``, same for targets.

    One ``lam ~ Beta(alpha, alpha)`` per batch, as in the paper. The partner is the flipped batch (as in
    GluonCV and timm) rather than a fresh permutation: the sampler already shuffles the batch, so the
    mirror is a random partner, and flipping costs no random draw and no index gather. ``lam`` is drawn
    on the CPU from ``generator`` if given, else from torch's global RNG, whose state the trainer seeds
    and checkpoints (``torch.get_rng_state``), so a resumed run draws the same ``lam`` sequence.
    ``alpha <= 0`` turns mixup off: the inputs come back unchanged with ``lam = 1`` and no draw is made.
    """
    if images.shape[0] != target_probs.shape[0]:
        raise ValueError(f"mixup: images batch {images.shape[0]} != targets batch {target_probs.shape[0]}")
    if alpha <= 0:
        return images, target_probs, 1.0
    if not images.is_floating_point() or not target_probs.is_floating_point():
        raise TypeError("mixup: images and targets must be floating point (normalize images, "
                        "turn labels into probabilities with smooth_labels first)")
    lam = _sample_beta(alpha, generator)
    mixed_images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    mixed_targets = target_probs.mul(lam).add_(target_probs.flip(0), alpha=1.0 - lam)
    return mixed_images, mixed_targets, lam


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target_probs: Tensor,
                      temperature: float) -> Tensor:
    """The paper's ``l(p, softmax(z)) + T^2 l(softmax(r / T), softmax(z / T))`` with ``l`` cross entropy.

    ``z`` student logits, ``r`` teacher logits (detached: the teacher is fixed), ``p`` the target
    probabilities (possibly smoothed and mixed). Cross entropy rather than KL, as written in the paper;
    the two differ by the teacher's entropy, a constant for the student. ``T^2`` keeps the soft term's
    gradient on the scale of the hard term's.
    """
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature} (distill.temperature)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ; do both models predict the same classes?")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # divide by T after casting up
    teacher_probs = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    hard = soft_cross_entropy(student_logits, target_probs)
    soft = soft_cross_entropy(student_logits.to(dtype) / temperature, teacher_probs)
    return hard + temperature**2 * soft


class ClassificationLoss(nn.Module):
    """The training loss: soft cross entropy, plus distillation when teacher logits are given.

    ``target`` is either integer labels ``[N]`` (smoothed here with ``label_smoothing``) or class
    probabilities ``[N, K]``, used as given: they are expected to be smoothed already, before mixup.
    """

    def __init__(self, label_smoothing: float = 0.0, temperature: float = 20.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.temperature = temperature

    def forward(self, logits: Tensor, target: Tensor, teacher_logits: Optional[Tensor] = None) -> Tensor:
        if target.is_floating_point():
            target_probs = target
        else:
            target_probs = smooth_labels(target, logits.shape[-1], self.label_smoothing)
        if teacher_logits is None:
            return soft_cross_entropy(logits, target_probs)
        return distillation_loss(logits, teacher_logits, target_probs, self.temperature)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, temperature={self.temperature}"
