"""Losses and mixup against the formulas of He et al. 2019 (§5.2 label smoothing, §5.3 distillation, §5.4 mixup)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from classification.losses import (
    ClassificationLoss,
    distillation_loss,
    mixup,
    smooth_labels,
    soft_cross_entropy,
)


# ---------------------------------------------------------------- label smoothing

def test_smooth_labels_values_and_rows_sum_to_one() -> None:
    labels = torch.tensor([0, 3, 4])
    q = smooth_labels(labels, num_classes=5, eps=0.1)
    assert q.shape == (3, 5) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    # Paper: q_i = 1 - eps on the true class, eps / (K - 1) elsewhere (not torch's eps / K).
    assert q[1, 3].item() == pytest.approx(0.9)
    off = q[1][torch.arange(5) != 3]
    torch.testing.assert_close(off, torch.full((4,), 0.1 / 4))


def test_smooth_labels_eps_zero_is_one_hot() -> None:
    labels = torch.tensor([2, 0, 1])
    assert torch.equal(smooth_labels(labels, 3, 0.0), F.one_hot(labels, 3).float())


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_smooth_labels_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        smooth_labels(torch.tensor([0]), 3, eps)


def test_smooth_labels_rejects_float_labels() -> None:
    with pytest.raises(TypeError, match="integer"):
        smooth_labels(torch.tensor([0.0]), 3, 0.1)


# ---------------------------------------------------------------- soft cross entropy

def test_soft_cross_entropy_matches_torch_for_one_hot() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 7), torch.randint(0, 7, (6,))
    got = soft_cross_entropy(logits, F.one_hot(labels, 7).float())
    torch.testing.assert_close(got, F.cross_entropy(logits, labels))


def test_soft_cross_entropy_matches_torch_label_smoothing_after_reparametrisation() -> None:
    # torch spreads eps' / K over all classes, so q_y = 1 - eps' (K-1)/K: the paper's eps is eps' (K-1)/K.
    torch.manual_seed(0)
    k, eps = 10, 0.1
    logits, labels = torch.randn(8, k), torch.randint(0, k, (8,))
    got = soft_cross_entropy(logits, smooth_labels(labels, k, eps))
    want = F.cross_entropy(logits, labels, label_smoothing=eps * k / (k - 1))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_cross_entropy_is_fp32_for_half_logits(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 5) * 30).to(dtype)
    target = smooth_labels(torch.tensor([0, 1, 2, 3]), 5, 0.1)
    got = soft_cross_entropy(logits, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, soft_cross_entropy(logits.float(), target))


def test_soft_cross_entropy_with_minus_inf_logits_of_classes_without_target_mass() -> None:
    """0 * log 0 = 0, as F.cross_entropy: a -inf logit (a masked class) of a class with no target mass is no NaN."""
    logits = torch.tensor([[2.0, -float("inf"), 0.5], [0.1, 0.2, -float("inf")]])
    labels = torch.tensor([0, 1])
    ours = soft_cross_entropy(logits, F.one_hot(labels, 3).float())
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels))


def test_soft_cross_entropy_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- label-smoothing optimum (paper eq. in §5.2)

def _optimal_gap(k: int, eps: float) -> float:
    return math.log((k - 1) * (1 - eps) / eps)


def test_label_smoothing_optimum_closed_form() -> None:
    # The smoothed loss is minimised by softmax(z) = q, i.e. z* = log q + const; the paper's gap follows.
    k, eps, y = 1000, 0.1, 7
    q = smooth_labels(torch.tensor([y]), k, eps).double()
    z = q.log().requires_grad_()
    soft_cross_entropy(z, q).backward()
    assert z.grad.abs().max().item() < 1e-6                      # stationary point (q is float32)
    gap = (z[0, y] - z[0, (y + 1) % k]).item()
    assert gap == pytest.approx(_optimal_gap(k, eps), abs=1e-3)
    assert gap == pytest.approx(9.104, abs=1e-3)                  # log(999 * 0.9 / 0.1) = log 8991


@pytest.mark.parametrize("k,eps", [(1000, 0.1), (10, 0.2)])
def test_label_smoothing_optimum_by_minimisation(k: int, eps: float) -> None:
    # Minimise the loss over a free logit vector from a random start: every off-class logit must end
    # up log((K-1)(1-eps)/eps) below the true one (plain one-hot CE would push the gap to infinity).
    # Adam, because the off-class curvature is ~eps/K: plain gradient descent would need ~1e5 steps.
    torch.manual_seed(0)
    y, steps = 3, 3000
    q = smooth_labels(torch.tensor([y]), k, eps).double()
    z = torch.randn(1, k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        soft_cross_entropy(z, q).backward()
        opt.step()
        decay.step()
    gaps = (z[0, y] - torch.cat([z[0, :y], z[0, y + 1:]])).detach()
    torch.testing.assert_close(gaps, torch.full_like(gaps, _optimal_gap(k, eps)), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- mixup

def _batch(n: int = 6, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.arange(n * 2 * 3 * 3, dtype=torch.float32).reshape(n, 2, 3, 3)
    return images, smooth_labels(torch.arange(n) % k, k, 0.1)


def test_mixup_pairs_each_example_with_the_flipped_batch() -> None:
    images, targets = _batch()
    torch.manual_seed(0)
    mixed_images, mixed_targets, lam = mixup(images, targets, alpha=0.2)
    assert isinstance(lam, float) and 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed_images, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets.flip(0))
    # Convex combinations of distributions are distributions.
    torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(len(targets)))
    assert mixed_targets.min() >= 0


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_mixup_off_is_identity(alpha: float) -> None:
    images, targets = _batch()
    state = torch.get_rng_state()
    mixed_images, mixed_targets, lam = mixup(images, targets, alpha=alpha)
    assert lam == 1.0 and mixed_images is images and mixed_targets is targets
    assert torch.equal(torch.get_rng_state(), state)             # no random draw when off


def test_mixup_lambda_follows_beta_alpha_alpha() -> None:
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.17857 for a = 0.2 (one lam per batch).
    alpha, n = 0.2, 4000
    images, targets = torch.zeros(2, 1), torch.zeros(2, 2)
    gen = torch.Generator().manual_seed(0)
    lams = torch.tensor([mixup(images, targets, alpha, generator=gen)[2] for _ in range(n)], dtype=torch.float64)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.03)     # ~5 standard errors
    assert lams.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.01)
    # U-shaped for alpha < 1: most mass near 0 and 1.
    assert ((lams < 0.1) | (lams > 0.9)).double().mean().item() > 0.6


def test_mixup_global_rng_is_reproducible_and_matches_torch_beta() -> None:
    images, targets = _batch()
    torch.manual_seed(123)
    first = mixup(images, targets, 0.2)
    torch.manual_seed(123)
    second = mixup(images, targets, 0.2)
    assert first[2] == second[2] and torch.equal(first[0], second[0])
    # Same draw as torch.distributions.Beta from the same global RNG state.
    torch.manual_seed(123)
    beta = torch.distributions.Beta(torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    assert first[2] == pytest.approx(beta.sample().item(), rel=1e-12)


def test_mixup_generator_state_restores_the_draw() -> None:
    images, targets = _batch()
    gen = torch.Generator().manual_seed(7)
    mixup(images, targets, 0.2, generator=gen)
    state = gen.get_state()
    global_state = torch.get_rng_state()
    lam = mixup(images, targets, 0.2, generator=gen)[2]
    assert torch.equal(torch.get_rng_state(), global_state)      # the explicit generator is the only one used
    gen.set_state(state)
    assert mixup(images, targets, 0.2, generator=gen)[2] == lam


def test_mixup_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        mixup(torch.zeros(3, 1), torch.zeros(2, 2), 0.2)


# ---------------------------------------------------------------- distillation

def _by_hand(z: torch.Tensor, r: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
    hard = -(p * F.log_softmax(z, -1)).sum(-1).mean()
    soft = -(F.softmax(r / t, -1) * F.log_softmax(z / t, -1)).sum(-1).mean()
    return hard + t * t * soft


@pytest.mark.parametrize("temperature", [1.0, 2.5, 20.0])
def test_distillation_equals_the_paper_formula(temperature: float) -> None:
    torch.manual_seed(0)
    z, r = torch.randn(5, 6), torch.randn(5, 6) * 3
    p = smooth_labels(torch.randint(0, 6, (5,)), 6, 0.1)
    got = distillation_loss(z, r, p, temperature)
    torch.testing.assert_close(got, _by_hand(z, r, p, temperature))


def test_distillation_gradient_reaches_student_not_teacher() -> None:
    torch.manual_seed(0)
    z = torch.randn(3, 4, requires_grad=True)
    r = torch.randn(3, 4, requires_grad=True)
    distillation_loss(z, r, F.one_hot(torch.tensor([0, 1, 2]), 4).float(), 20.0).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert r.grad is None


def test_distillation_student_equals_teacher_at_t1() -> None:
    # With T = 1 and r = z the soft term is the entropy of softmax(z): the loss is CE(p) + H(softmax(z)),
    # and its gradient from the soft term vanishes (the student already matches the teacher).
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    p = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    entropy = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(z, z, p, 1.0), soft_cross_entropy(z, p) + entropy)

    student = z.clone().requires_grad_()
    distillation_loss(student, z, p, 1.0).backward()
    hard_only = z.clone().requires_grad_()
    soft_cross_entropy(hard_only, p).backward()
    torch.testing.assert_close(student.grad, hard_only.grad)


def test_distillation_rejects_nonpositive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2) / 2, 0.0)


# ---------------------------------------------------------------- the trainer's entry point

def test_classification_loss_integer_labels_are_smoothed() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    loss = ClassificationLoss(label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, labels), soft_cross_entropy(logits, smooth_labels(labels, 5, 0.1)))
    torch.testing.assert_close(ClassificationLoss()(logits, labels), F.cross_entropy(logits, labels))


def test_classification_loss_soft_targets_used_as_given() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    targets = F.softmax(torch.randn(4, 5), -1)
    torch.testing.assert_close(ClassificationLoss(label_smoothing=0.1)(logits, targets),
                               soft_cross_entropy(logits, targets))


def test_classification_loss_with_teacher_is_distillation() -> None:
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    loss = ClassificationLoss(label_smoothing=0.1, temperature=20.0)
    want = distillation_loss(logits, teacher, smooth_labels(labels, 5, 0.1), 20.0)
    torch.testing.assert_close(loss(logits, labels, teacher_logits=teacher), want)


def _log_softmax_by_hand(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(-1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))


# float64 to 1e-6 absolute; float32 (the loss is ~900 at T = 20: T^2 = 400) to 1e-6 relative.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, {"abs": 1e-6, "rel": 0}),
                                             (torch.float32, {"abs": 0, "rel": 1e-6})], ids=["float64", "float32"])
def test_distillation_on_a_mixed_batch_equals_the_paper_formula_by_hand(dtype: torch.dtype, tolerance: dict) -> None:
    """The trainer's case: smoothed labels mixed with the flipped batch, T = 20. The loss written out with
    exp, log and sums in float64: l(p, softmax(z)) + T^2 l(softmax(r/T), softmax(z/T)), l cross entropy."""
    torch.manual_seed(0)
    n, k, eps, t = 8, 10, 0.1, 20.0
    z, r, labels = torch.randn(n, k) * 2, torch.randn(n, k) * 5, torch.randint(0, k, (n,))
    _, p, lam = mixup(torch.randn(n, 3), smooth_labels(labels, k, eps), alpha=0.2,
                      generator=torch.Generator().manual_seed(1))
    assert 0 < lam < 1

    # Targets by hand: q = 1 - eps on the label, eps / (K - 1) elsewhere; p_i = lam q_i + (1 - lam) q_{n-1-i}.
    q = torch.full((n, k), eps / (k - 1), dtype=torch.float64)
    q[torch.arange(n), labels] = 1 - eps
    p_by_hand = lam * q + (1 - lam) * q.flip(0)
    torch.testing.assert_close(p.double(), p_by_hand, rtol=0, atol=1e-7)

    z64, r64 = z.double(), r.double()
    teacher = torch.exp(r64 / t) / torch.exp(r64 / t).sum(-1, keepdim=True)
    hard = -(p_by_hand * _log_softmax_by_hand(z64)).sum(-1).mean()
    soft = -(teacher * _log_softmax_by_hand(z64 / t)).sum(-1).mean()
    want = (hard + t ** 2 * soft).item()
    # The hard term on mixed targets is the mixup loss: lam CE(z, q_i) + (1 - lam) CE(z, q_{n-1-i}).
    ce_i, ce_partner = (-(target * _log_softmax_by_hand(z64)).sum(-1).mean().item() for target in (q, q.flip(0)))
    assert hard.item() == pytest.approx(lam * ce_i + (1 - lam) * ce_partner, rel=1e-12)

    got = distillation_loss(z.to(dtype), r.to(dtype), p_by_hand.to(dtype), t)
    assert got.dtype == dtype and got.item() == pytest.approx(want, **tolerance)
    via_trainer = ClassificationLoss(label_smoothing=eps, temperature=t)(z.to(dtype), p_by_hand.to(dtype), r.to(dtype))
    assert via_trainer.item() == pytest.approx(want, **tolerance)
