"""runtime.step without a host sync per step: the skip decision on the device (fused SGD's found_inf), a
skipped step identical to an omitted one, the streak read at check points, resume from older state."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from runtime.checkpoint import restore_training_state, training_state
from runtime.optim import build_optimizer, param_groups
from runtime.precision import setup_precision
from runtime.schedules import build_scheduler
from runtime.step import OptimizerStep, TrainingDiverged

STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=g), torch.randn(6, 3, generator=g)) for _ in range(n)]


def _stepper(model: nn.Module, precision: str, optimizer=None, max_nonfinite: int = 3, init_scale=2.0 ** 16):
    optimizer = optimizer or build_optimizer(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                             no_bias_decay=True)
    scheduler = build_scheduler(optimizer, base_lr=0.05, total_steps=20, warmup_steps=3)
    prec = setup_precision(precision, torch.device("cpu"))
    if precision == "fp16":
        prec.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return OptimizerStep(optimizer, scheduler, prec.scaler, max_nonfinite=max_nonfinite), prec


def _plain_sgd(model: nn.Module) -> torch.optim.SGD:
    """torch's single-tensor SGD over the same groups: the reference implementation."""
    return torch.optim.SGD(param_groups(model, 0.01, True), lr=0.05, momentum=0.9, nesterov=True,
                           foreach=False, fused=False)


def _loss(model, prec, x, y, nan: bool = False) -> torch.Tensor:
    with prec.autocast():
        out = model(x)
    loss = nn.functional.mse_loss(out.float(), y)
    return loss * float("nan") if nan else loss


def _momenta(optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"].clone() for g in optimizer.param_groups for p in g["params"]]


class _HostReads:
    """Counts the Python-level ways a tensor reaches the host (each a sync on CUDA)."""
    NAMES = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_reads_nothing_from_the_device(monkeypatch, precision):
    """Finite and non-finite steps, every precision: no item/tolist/bool/float... inside step(); the
    non-fused optimizer, which needs the host decision, is counted (the counter works)."""
    model = _model()
    stepper, prec = _stepper(model, precision)
    assert stepper.on_device and stepper.optimizer.defaults["fused"]
    batches = _batches(4)
    losses = [_loss(model, prec, x, y, nan=k == 1) for k, (x, y) in enumerate(batches)]
    reads = _HostReads(monkeypatch)
    for loss in losses[:2]:
        stepper.backward(loss)
        stepper.step(loss)
    assert reads.calls == []
    monkeypatch.undo()
    assert stepper.nonfinite_streak == 1 and stepper.skipped_steps == 1

    plain = _model()
    host_stepper, prec = _stepper(plain, precision, optimizer=_plain_sgd(plain))
    assert not host_stepper.on_device
    loss = _loss(plain, prec, *batches[0])
    reads = _HostReads(monkeypatch)
    host_stepper.backward(loss)
    host_stepper.step(loss)
    assert reads.calls  # fp32/bf16: our .item(); fp16: GradScaler's
    monkeypatch.undo()


def _run(precision: str, nan_at: int | None = None, omit: int | None = None, optimizer: str = "fused"):
    """STEPS steps through OptimizerStep; step ``nan_at`` has a NaN loss. ``omit``: the reference run
    that never calls the optimizer at that step (only the schedule advances; fp16: the scale halves
    as a skip would halve it)."""
    model = _model()
    opt = {"fused": None, "plain": _plain_sgd(model)}[optimizer]
    stepper, prec = _stepper(model, precision, optimizer=opt, max_nonfinite=STEPS,
                             init_scale=2.0 ** 15 if omit == 0 else 2.0 ** 16)
    stepped = []
    for k, (x, y) in enumerate(_batches()):
        if k == omit:
            with pytest.warns(UserWarning, match="lr_scheduler.step") if k == 0 else contextlib.nullcontext():
                stepper.scheduler.step()  # torch warns when the schedule starts before the optimizer
            if precision == "fp16" and k > 0:
                stepper.scaler.update(stepper.scaler.get_scale() / 2)
            continue
        loss = _loss(model, prec, x, y, nan=k == nan_at)
        stepper.backward(loss)
        stepped.append(bool(stepper.step(loss)))
    lrs = [g["lr"] for g in stepper.optimizer.param_groups]
    return model, stepper, stepped, lrs


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("k", [0, 2])
def test_a_skipped_step_equals_an_omitted_one(precision, k):
    """Weights, momentum buffers and the lr after a NaN loss at step k are those of a run in which step
    k's optimizer update never happened, bit for bit, the first step included (fused SGD would start the
    momentum from uninitialised memory)."""
    skipped_model, skipped, stepped, lrs = _run(precision, nan_at=k)
    omitted_model, omitted, _, reference_lrs = _run(precision, omit=k)
    assert stepped == [i != k for i in range(STEPS)]
    assert lrs == reference_lrs and skipped.scheduler.last_epoch == STEPS
    for a, b in zip(skipped_model.parameters(), omitted_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(_momenta(skipped.optimizer), _momenta(omitted.optimizer)):
        assert torch.equal(a, b)
    if precision == "fp16":
        assert skipped.scaler.get_scale() == omitted.scaler.get_scale() == 2.0 ** 15


@pytest.mark.parametrize("nan_at", [None, 0, 3])
def test_fused_sgd_follows_torchs_single_tensor_sgd(nan_at):
    """build_optimizer's fused SGD (Nesterov, a decayed and an exempt group) against torch's single-tensor
    SGD on the host path, with and without a skipped step: the same trajectory to float rounding."""
    fused_model, fused, fused_stepped, _ = _run("fp32", nan_at=nan_at)
    plain_model, plain, plain_stepped, _ = _run("fp32", nan_at=nan_at, optimizer="plain")
    assert fused.on_device and not plain.on_device and fused_stepped == plain_stepped
    assert [g["weight_decay"] for g in fused.optimizer.param_groups] == [0.01, 0.0]
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(_momenta(fused.optimizer), _momenta(plain.optimizer)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_streak_is_read_at_the_next_check_even_after_recovery():
    """max_nonfinite=3: NaN, finite (check: no stop), NaN x 3, finite, then the check: it raises, naming
    the longest streak, though the run had recovered; streak and skipped count in the state_dict."""
    model = _model()
    stepper, prec = _stepper(model, "fp32", max_nonfinite=3)
    for k, (x, y) in enumerate(_batches(6)):
        loss = _loss(model, prec, x, y, nan=k in (0, 2, 3, 4))
        stepper.backward(loss)
        stepper.step(loss)
        if k == 1:
            stepper.check_diverged("step 2", "last.pth")  # 1 in a row so far: no stop
    assert stepper.state_dict() == {"nonfinite_streak": 0, "skipped_steps": 4}
    with pytest.raises(TrainingDiverged, match=r"non-finite for 3 steps in a row \(train.max_nonfinite=3; seen "
                                               r"at step 6\).*last.pth"):
        stepper.check_diverged("step 6", "last.pth")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_from_a_checkpoint_of_the_single_tensor_optimizer(precision):
    """A checkpoint written before the fused optimizer (torch's SGD with fused=None, the stepper state
    {"nonfinite_streak": 2}) resumes into a fused run: momentum loaded, still fused (torch's
    load_state_dict would copy fused=None from the saved groups, and the fused path would then fail on
    found_inf), the streak continued (one more NaN step reaches max_nonfinite=3)."""
    old_model = _model()
    old_opt = torch.optim.SGD(param_groups(old_model, 0.01, True), lr=0.05, momentum=0.9, nesterov=True)
    old, prec = _stepper(old_model, precision, optimizer=old_opt)
    for x, y in _batches(2):
        loss = _loss(old_model, prec, x, y)
        old.backward(loss)
        old.step(loss)
    ckpt = copy.deepcopy(training_state(old_model, old))  # as written to disk: no tensor shared with `old`
    ckpt["stepper"] = {"nonfinite_streak": 2}  # the older format

    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))
    stepper, prec = _stepper(model, precision)
    restore_training_state(ckpt, model, stepper)
    assert all(g["fused"] for g in stepper.optimizer.param_groups)
    assert stepper.state_dict() == {"nonfinite_streak": 2, "skipped_steps": 0}
    for a, b in zip(_momenta(stepper.optimizer), _momenta(old_opt)):
        assert torch.equal(a, b)
    x, y = _batches(3)[2]
    loss = _loss(model, prec, x, y)
    stepper.backward(loss)
    assert bool(stepper.step(loss))  # a finite step: the fused kernel updates
    old_loss = _loss(old_model, prec, x, y)
    old.backward(old_loss)
    old.step(old_loss)
    for a, b in zip(model.parameters(), old_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    stepper.load_state_dict({"nonfinite_streak": 2})
    loss = _loss(model, prec, x, y, nan=True)
    stepper.backward(loss)
    assert not bool(stepper.step(loss))
    with pytest.raises(TrainingDiverged, match="non-finite for 3 steps"):
        stepper.check_diverged("here", "last.pth")
