"""Parameter groups and the optimizer: no bias decay (He et al. 2019 §3.1) and Nesterov SGD (§2.1)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from runtime.optim import build_optimizer, param_groups


def _names(group: dict) -> set[str]:
    return set(group["param_names"])


def _split(groups: list[dict]) -> tuple[set[str], set[str]]:
    decay = set().union(*(_names(g) for g in groups if g["weight_decay"] > 0))
    no_decay = set().union(*(_names(g) for g in groups if g["weight_decay"] == 0))
    return decay, no_decay


def test_resnet18_no_decay_group_is_bn_and_biases() -> None:
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):                                    # names and shapes only: no memory, no init cost
        model = torchvision.models.resnet18()
    names = [n for n, _ in model.named_parameters()]
    # Independent of the module types: torchvision names its BN layers bn1/bn2 and downsample.1.
    bn = re.compile(r"(^|\.)(bn\d|downsample\.1)\.(weight|bias)$")
    want_no_decay = {n for n in names if bn.search(n) or n.endswith(".bias")}
    assert "fc.bias" in want_no_decay and "bn1.weight" in want_no_decay

    groups = param_groups(model, weight_decay=1e-4, no_bias_decay=True)
    decay, no_decay = _split(groups)
    assert no_decay == want_no_decay
    assert decay == set(names) - want_no_decay
    assert all(re.search(r"(conv\d|downsample\.0|^fc)\.weight$", n) for n in decay)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert {g["weight_decay"] for g in groups} == {1e-4, 0.0}


def test_without_no_bias_decay_everything_decays() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = param_groups(model, weight_decay=5e-4, no_bias_decay=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert groups[0]["params"] == list(model.parameters())


class _Scale(nn.Module):
    """A 1-D learnable parameter that is neither a bias nor a normalization weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class _MyNorm(nn.modules.batchnorm._NormBase):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def test_exactly_biases_and_norm_weights_skip_decay() -> None:
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({
        "conv1d": nn.Conv1d(4, 4, 1),
        "bn": nn.BatchNorm1d(4),
        "gn": nn.GroupNorm(2, 4),
        "ln": nn.LayerNorm(4),
        "inorm": nn.InstanceNorm1d(4, affine=True),
        "custom_norm": _MyNorm(4),
        "prelu": nn.PReLU(4),
        "scale": _Scale(),
        "a": shared,
        "b": shared,                                              # the same module twice: its params once
        "attn": nn.MultiheadAttention(4, 2),                      # in_proj_bias: a bias by another name
        "rms": nn.RMSNorm(4),
    })
    groups = param_groups(model, weight_decay=1e-4, no_bias_decay=True)
    decay, no_decay = _split(groups)
    assert decay == {"conv1d.weight", "prelu.weight", "scale.weight", "a.weight", "attn.in_proj_weight",
                     "attn.out_proj.weight"}
    assert no_decay == {"conv1d.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias",
                        "inorm.weight", "inorm.bias", "custom_norm.weight", "custom_norm.bias", "a.bias",
                        "attn.in_proj_bias", "attn.out_proj.bias", "rms.weight"}
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


def test_a_tensor_shared_with_a_norm_layer_skips_decay() -> None:
    linear, norm = nn.Linear(4, 4, bias=False), nn.LayerNorm(4)
    norm.weight = nn.Parameter(torch.ones(4))
    model = nn.Sequential(linear, norm)
    model.extra = _Scale()
    model.extra.weight = norm.weight                              # tied: one tensor, two roles
    groups = param_groups(model, weight_decay=1e-4, no_bias_decay=True)
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is norm.weight for p in no_decay)
    assert sum(len(g["params"]) for g in groups) == 3             # linear.weight, norm.weight, norm.bias


def test_build_optimizer_settings() -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.4, weight_decay=1e-4, no_bias_decay=True)
    assert isinstance(opt, torch.optim.SGD)
    for group in opt.param_groups:
        assert group["lr"] == 0.4 and group["momentum"] == 0.9 and group["nesterov"] is True


def test_two_sgd_steps_match_hand_computed_nesterov_updates() -> None:
    # v <- mu v + (g + wd w);  w <- w - lr (g + wd w + mu v)   (torch's Nesterov form, v_0 = 0)
    torch.manual_seed(0)
    lr, mu, wd = 0.1, 0.9, 0.01
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=lr, momentum=mu, nesterov=True, weight_decay=wd, no_bias_decay=True)

    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    v_w, v_b = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(2):
        g_w, g_b = torch.randn_like(w), torch.randn_like(b)
        model.weight.grad, model.bias.grad = g_w.clone(), g_b.clone()
        opt.step()
        d_w = g_w + wd * w                                        # decayed tensor
        v_w = mu * v_w + d_w
        w = w - lr * (d_w + mu * v_w)
        d_b = g_b                                                 # bias: no decay
        v_b = mu * v_b + d_b
        b = b - lr * (d_b + mu * v_b)
        torch.testing.assert_close(model.weight.detach(), w)
        torch.testing.assert_close(model.bias.detach(), b)


def test_nesterov_without_momentum_is_a_config_error() -> None:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match="optim.nesterov=true needs optim.momentum > 0"):
        build_optimizer(nn.Linear(2, 2), lr=0.1, momentum=0.0, nesterov=True)
    build_optimizer(nn.Linear(2, 2), lr=0.1, momentum=0.0, nesterov=False)  # plain SGD


def _conv_net(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),
                          nn.Conv2d(4, 4, 3, groups=4))  # a depthwise weight: size-1 dimensions
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _steps(model: nn.Module, opt: torch.optim.Optimizer, grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g
        opt.step()
    return [p.detach().contiguous() for p in model.parameters()]


@pytest.mark.parametrize("grad_format", ["same", "contiguous"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_sgd_on_channels_last_weights_equals_the_contiguous_run(nesterov: bool, grad_format: str) -> None:
    """build_optimizer's SGD on channels_last weights gives the fused kernel's contiguous-format trajectory bit for
    bit, also when a gradient comes in another layout than its weight ("contiguous": assigned by hand), which
    torch 2.14's own fused CPU step mixes up."""
    torch.manual_seed(1)
    shapes = [p.shape for p in _conv_net(False).parameters()]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-2, no_bias_decay=True)
    reference = _steps(model := _conv_net(False), build_optimizer(model, **kw), grads)

    def laid_out(model: nn.Module) -> list[list[torch.Tensor]]:
        if grad_format == "contiguous":
            return [[g.clone() for g in step] for step in grads]
        return [[torch.empty_like(p).copy_(g) for p, g in zip(model.parameters(), step)] for step in grads]

    ours = _steps(model := _conv_net(True), opt := build_optimizer(model, **kw), laid_out(model))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    for p in model.parameters():  # the state keeps each weight's layout (a checkpoint loads into torch's SGD)
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()


def test_fused_sgd_step_copies_nothing_on_channels_last_weights() -> None:
    """The fused kernel sees each tensor in its memory order: no gradient copied per step (torch 2.14's own step
    copies every gradient not in the contiguous format)."""
    from torch.profiler import ProfilerActivity, profile

    def copies(opt: torch.optim.Optimizer) -> int:
        opt.step()  # momentum buffers created
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::copy_", "aten::clone"))

    model = _conv_net(True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    assert copies(build_optimizer(model, lr=0.1, momentum=0.9)) == 0


def test_sgd_copies_a_momentum_buffer_of_the_other_layout_into_its_weights() -> None:
    """A momentum buffer loaded from a run of the other memory format (contiguous checkpoint, channels_last
    model) is copied into its weight's layout: the resumed step equals the uninterrupted one."""
    torch.manual_seed(2)
    shapes = [p.shape for p in _conv_net(False).parameters()]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    reference = _steps(model := _conv_net(False), build_optimizer(model, **kw), grads)
    first = _conv_net(False)
    opt = build_optimizer(first, **kw)
    _steps(first, opt, grads[:1])
    resumed = _conv_net(True)
    resumed.load_state_dict(first.state_dict())
    opt2 = build_optimizer(resumed, **kw)
    opt2.load_state_dict(opt.state_dict())
    assert not next(iter(opt2.state.values()))["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    out = _steps(resumed, opt2, [[g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g
                                  for g in grads[1]]])
    for a, b in zip(out, reference):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_steps_a_parameter_whose_storage_was_replaced(momentum: float) -> None:
    """The memory-order views are cached per parameter: a parameter given new storage between steps (``p.data =
    ...``, as ``Module.to`` does) is stepped in its new storage, as torch's SGD steps it."""
    torch.manual_seed(3)
    shapes = [p.shape for p in _conv_net(False).parameters()]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.1, momentum=momentum, nesterov=False, weight_decay=1e-2)

    def run(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        for k, step in enumerate(grads):
            if k == 2:
                for p in model.parameters():
                    p.data = p.data.clone()  # new storage, same layout
            for p, g in zip(model.parameters(), step):
                p.grad = torch.empty_like(p).copy_(g)
            opt.step()
        return [p.detach().contiguous() for p in model.parameters()]

    model = _conv_net(False)
    reference = run(model, torch.optim.SGD(model.parameters(), **kw))
    model = _conv_net(True)
    ours = run(model, build_optimizer(model, **kw))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
