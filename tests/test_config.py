"""runtime.config: YAML -> typed dataclasses, `_base_` includes, dotted overrides, errors that say where."""
from __future__ import annotations  # the schema below must still resolve (get_type_hints)

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from classification.config import Config
from runtime.config import ConfigError, dump_config, format_config, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "classification"


@dataclass
class Inner:
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [30, 60])
    schedule: Literal["step", "cosine"] = "step"
    nesterov: bool = True


@dataclass
class Schema:
    optim: Inner = field(default_factory=Inner)
    epochs: int = 10
    name: str = "run"
    resume: Optional[str] = None
    mean: Optional[list[float]] = None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config(None, Schema) == Schema()


def test_round_trip(tmp_path):
    cfg = Schema(optim=Inner(lr=1e-4, milestones=[5], schedule="cosine", nesterov=False), epochs=3,
                 name="1e-4", resume="null", mean=[0.5, 2.5e-7])  # strings that look like a float / null
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml", Schema) == cfg
    assert "milestones: [5]" in format_config(cfg)


def test_round_trip_classification_config(tmp_path):
    cfg = load_config(CONFIGS / "resnet50d_8xb128_efficient-cosine-ls-distill_imagenet.yaml", Config)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", Config) == cfg
    assert to_dict(cfg)["optim"]["weight_decay"] == 1e-4


def test_base_merge_order_and_relative_paths(tmp_path):
    write(tmp_path / "_base_" / "a.yaml", "optim: {lr: 0.2, milestones: [1, 2]}\nepochs: 5\nname: a\n")
    write(tmp_path / "_base_" / "b.yaml", "_base_: a.yaml\noptim: {lr: 0.3}\nname: b\n")  # relative to b.yaml
    write(tmp_path / "_base_" / "c.yaml", "name: c\nepochs: 7\n")
    child = write(tmp_path / "exp" / "child.yaml", "_base_: [../_base_/b.yaml, ../_base_/c.yaml]\nname: child\n")
    cfg = load_config(child, Schema)
    # b over a, section merged key by key; c after b; the file's own keys last.
    assert cfg.optim == Inner(lr=0.3, milestones=[1, 2])
    assert (cfg.epochs, cfg.name) == (7, "child")


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cyclic _base_ include: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml", Schema)


def test_missing_base_names_the_including_file(tmp_path):
    write(tmp_path / "a.yaml", "epochs: 1\n_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml, line 2: _base_ 'nope.yaml' not found"):
        load_config(tmp_path / "a.yaml", Schema)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=1e-4", {"optim": Inner(lr=1e-4)}),              # YAML 1.1 alone would read a string
    ("optim.lr=2", {"optim": Inner(lr=2.0)}),                  # int accepted for float
    ("optim.milestones=[3, 6]", {"optim": Inner(milestones=[3, 6])}),
    ("optim.schedule=cosine", {"optim": Inner(schedule="cosine")}),
    ("optim.nesterov=false", {"optim": Inner(nesterov=False)}),
    ("epochs=90", {"epochs": 90}),
    ("name=resnet50d", {"name": "resnet50d"}),
    ("resume=auto", {"resume": "auto"}),
    ("mean=[0.5, 1]", {"mean": [0.5, 1.0]}),
    ("mean=null", {"mean": None}),
])
def test_override_types(override, expected):
    cfg = load_config(None, Schema, [override])
    assert cfg == Schema(**expected)
    assert type(cfg.optim.lr) is float


def test_overrides_apply_after_file_in_order(tmp_path):
    path = write(tmp_path / "a.yaml", "optim: {lr: 0.2}\nresume: last.pt\n")
    cfg = load_config(path, Schema, ["optim.lr=0.3", "optim.lr=0.4", "resume=null"])
    assert (cfg.optim.lr, cfg.resume) == (0.4, None)


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "exp.yaml", "epochs: 3\noptim:\n  lr: 0.1\n  mlestones: [1]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, Schema)
    message = str(err.value)
    assert f"{path}, line 4" in message
    assert "unknown key 'optim.mlestones'" in message and "did you mean 'optim.milestones'?" in message
    assert "lr, milestones, schedule, nesterov" in message  # the valid keys of the section


def test_unknown_key_in_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "epoch: 3\n")
    path = write(tmp_path / "exp.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml, line 1: unknown key 'epoch'; did you mean 'epochs'\?"):
        load_config(path, Schema)


def test_unknown_key_in_override_points_to_the_right_section():
    with pytest.raises(ConfigError, match=r"command line override 'train\.lr=0\.1': unknown key 'train\.lr'; "
                                          r"did you mean 'optim\.lr'\?"):
        load_config(None, Config, ["train.lr=0.1"])


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'optim\.schedule' must be one of 'step', 'cosine'; got str 'cosin'"):
        load_config(None, Schema, ["optim.schedule=cosin"])


@pytest.mark.parametrize("override, message", [
    ("epochs=1.5", "'epochs' expects int, got float 1.5"),
    ("epochs=true", "'epochs' expects int, got bool True"),
    ("optim.nesterov=1", "'optim.nesterov' expects bool, got int 1"),
    ("optim.lr=fast", "'optim.lr' expects float, got str 'fast'"),
    ("optim.lr=null", "'optim.lr' expects float, got null"),
    ("name=3", "'name' expects str, got int 3"),
    ("optim.milestones=[30, x]", "'optim.milestones[1]' expects int, got str 'x'"),
    ("optim.milestones=30", "'optim.milestones' expects a list of int, got int 30"),
    ("optim=0.1", "'optim' is a section and needs a mapping of its keys (lr, milestones, schedule, nesterov)"),
    ("epochs", "expected key=value"),
])
def test_type_errors_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, Schema, [override])
    assert str(err.value).startswith(f"command line override {override!r}: ")
    assert message in str(err.value)


def test_type_error_in_file_names_file_and_line(tmp_path):
    path = write(tmp_path / "exp.yaml", "name: x\nepochs: ten\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml, line 2: 'epochs' expects int, got str 'ten'"):
        load_config(path, Schema)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path / "exp.yaml", "optim: {lr: 0.1}\nepochs: 1\noptim: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'optim' \(first on line 1\)"):
        load_config(path, Schema)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "# nothing\n"), Schema) == Schema()


# ---------------------------------------------------------------------------------------------- shipped configs
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
EXPERIMENTS = [p for p in ALL_YAML if "_base_" not in p.parts]


def test_configs_exist():
    assert len(EXPERIMENTS) >= 29 and any(p.parent.name == "fashion_mnist" for p in EXPERIMENTS)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    assert isinstance(load_config(path, Config), Config)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_config_name_encodes_what_it_runs(path):
    """`<model>_<gpus>xb<batch>_<recipe>_<dataset>.yaml`: the name must agree with the resolved values."""
    cfg = load_config(path, Config)
    model, batch, recipe, dataset = re.fullmatch(r"(.+)_\d+xb(\d+)_([^_]+)_([^_]+)", path.stem).groups()
    tricks = recipe.split("-")
    assert cfg.model.name == model
    assert cfg.train.batch_size == int(batch)
    assert cfg.data.name == dataset.replace("-", "_")
    assert cfg.output_dir == f"runs/classification/{path.stem}"
    assert (cfg.optim.schedule == "cosine") == ("cosine" in tricks)
    assert (cfg.train.label_smoothing == 0.1) == ("ls" in tricks)
    assert (cfg.train.mixup_alpha == 0.2) == ("mixup" in tricks)
    assert (cfg.train.epochs == 200) == ("200e" in tricks)
    assert (cfg.distill.teacher is not None) == ("distill" in tricks)
    if "distill" in tricks:
        assert cfg.distill.teacher == "resnet152d" and cfg.distill.temperature == 20.0
        assert ("mixup" in cfg.distill.teacher_weights) == ("mixup" in tricks)  # mixup students need a mixup teacher
    if dataset == "imagenet":
        efficient = "efficient" in tricks
        assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4 and cfg.optim.nesterov
        assert cfg.train.precision == ("fp16" if efficient else "fp32")
        assert cfg.optim.warmup_epochs == (5 if efficient else 0)
        assert cfg.optim.no_bias_decay == efficient
        assert cfg.model.zero_init_last == (efficient and model.startswith("resnet"))
        assert cfg.data.img_size == (299 if model == "inception_v3" else 224)


@dataclass
class WithMapping:
    kwargs: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def test_mapping_fields_merge_across_layers(tmp_path):
    base = write(tmp_path / "base.yaml", "kwargs: {a: 1, b: x}\nsizes: {small: 8}\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\nkwargs: {b: y}\n")
    cfg = load_config(top, WithMapping, ["kwargs.c=true", "sizes.large=64"])
    assert cfg.kwargs == {"a": 1, "b": "y", "c": True}
    assert cfg.sizes == {"small": 8, "large": 64}


def test_mapping_field_errors():
    with pytest.raises(ConfigError, match="'kwargs' expects a mapping, got"):
        load_config(None, WithMapping, ["kwargs=3"])
    with pytest.raises(ConfigError, match=r"'sizes.big' expects int"):
        load_config(None, WithMapping, ["sizes.big=huge"])


def test_model_kwargs_reach_the_builder_or_fail_naming_the_key(tmp_path):
    from classification.train import build_model
    cfg = load_config(None, Config, ["model.name=resnet18d", "model.kwargs.stem_pool=false"])
    assert build_model(cfg, 10).variant["stem_pool"] is False
    cfg = load_config(None, Config, ["model.name=mobilenet", "model.kwargs.stem_pool=false"])
    with pytest.raises(ConfigError, match="model.kwargs.*mobilenet"):
        build_model(cfg, 10)


def test_bounds_rules():
    from dataclasses import dataclass, field

    from runtime.config import check_bounds

    @dataclass
    class Inner:
        n: int = 1
        p: float = 0.5
        sizes: list = field(default_factory=lambda: [8, 16])
        maybe: Optional[int] = None

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)

    rules = {"inner.n": ">= 1", "inner.p": "[0, 1)", "inner.sizes": "{8, 16, 32}", "inner.maybe": "> 0"}
    check_bounds(Outer(), rules)  # None passes
    for inner, message in ((Inner(n=0), "inner.n=0: must be >= 1"), (Inner(p=1.0), r"inner.p=1.0: must be \[0, 1\)"),
                           (Inner(sizes=[8, 12]), r"inner.sizes=\[8, 12\]: must be \{8, 16, 32\}"),
                           (Inner(maybe=0), "inner.maybe=0: must be > 0")):
        with pytest.raises(ConfigError, match=message):
            check_bounds(Outer(inner), rules)
    check_bounds(Outer(Inner(p=0.0, maybe=3)), {**rules, "inner.p": "(-1, 0]"})
    shaped = {"inner.sizes": "ascending pair >= 1"}
    check_bounds(Outer(), shaped)
    for sizes, message in (([8], "must be a pair"), ([8, 16, 32], "must be a pair"), ([16, 8], "ascending order"),
                           ([0, 8], "must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            check_bounds(Outer(Inner(sizes=sizes)), shaped)
    with pytest.raises(ConfigError, match="non-empty"):
        check_bounds(Outer(Inner(sizes=[])), {"inner.sizes": "nonempty >= 1"})
    check_bounds(Outer(Inner(n=8, p=0.5)), {}, [("inner.p", "<", "inner.n"), ("inner.sizes", "<=", "inner.sizes")])
    for relation, message in ((("inner.n", "<", "inner.p"), r"inner.n=1: must be < inner.p=0.5"),
                              (("inner.n", "<=", "inner.maybe"), None)):
        if message is None:
            check_bounds(Outer(), {}, [relation])  # None on either side passes
        else:
            with pytest.raises(ConfigError, match=message):
                check_bounds(Outer(), {}, [relation])
    with pytest.raises(ConfigError, match=r"element by element"):
        check_bounds(Outer(), {}, [("inner.sizes", "<", "inner.sizes")])
    with pytest.raises(KeyError, match="inner.nope"):
        check_bounds(Outer(), {"inner.nope": ">= 0"})


@pytest.mark.parametrize("schema", ["classification", "segmentation", "detection"])
def test_every_bound_names_a_key_and_the_defaults_and_shipped_configs_keep_them(schema):
    import glob

    from classification.config import Config
    from detection.config import DetectionConfig
    from runtime.config import check_bounds
    from segmentation.config import SegmentationConfig
    from tricks.cli import load_task_config

    cls = {"classification": Config, "segmentation": SegmentationConfig, "detection": DetectionConfig}[schema]
    check_bounds(cls(), cls.BOUNDS)  # no KeyError: every bound names a key of the schema
    repo = Path(__file__).resolve().parents[1]
    configs = [f for f in glob.glob(str(repo / "configs" / "**" / "*.yaml"), recursive=True) if "_base_" not in f]
    loaded = [cfg for cfg in map(load_task_config, configs, [[]] * len(configs)) if isinstance(cfg, cls)]
    assert loaded  # load_task_config checks the bounds


@pytest.mark.parametrize("schema,override,message", [
    ("classification", "data.hflip=1.5", r"data.hflip=1.5: must be \[0, 1\]"),
    ("segmentation", "optim.lr=0", r"optim.lr=0.0: must be > 0"),
    ("classification", "optim.momentum=1", r"optim.momentum=1.0: must be \[0, 1\)"),
    ("segmentation", "model.output_stride=12", r"model.output_stride=12: must be \{8, 16, 32\}"),
    ("segmentation", "data.crop_size=[512, 0]", r"data.crop_size=\[512, 0\]: must be >= 1"),
    ("detection", "model.min_size_train=[640, -1]", r"model.min_size_train=\[640, -1\]: must be >= 1"),
    # shapes and relations between keys
    ("segmentation", "data.crop_size=[96]", r"data.crop_size=\[96\]: must be a pair \[a, b\], each >= 1"),
    ("segmentation", "data.ratio_range=[2.0, 0.5]", r"data.ratio_range=\[2.0, 0.5\]: must be in ascending order"),
    ("segmentation", "eval.stride=[600, 300]", r"eval.stride=\[600, 300\]: must be <= eval.crop_size=\[512, 512\]"),
    ("segmentation", "eval.scales=[]", r"eval.scales=\[\]: must be a non-empty list"),
    ("detection", "model.min_size_train=[]", r"model.min_size_train=\[\]: must be a non-empty list"),
    ("detection", "optim.milestones=[300, 100]", r"optim.milestones=\[300, 100\]: must be in ascending order"),
    ("classification", "data.translate=224", r"data.translate=224: must be < data.img_size=224"),
    ("classification", "data.max_area=0.05", r"data.min_area=0.08: must be <= data.max_area=0.05"),
    ("classification", "data.val_crop=300", r"data.val_crop=300: must be <= data.val_resize=256"),
    ("detection", "data.std=[0.2, 0, 0.2]", r"data.std=\[0.2, 0.0, 0.2\]: must be > 0"),
])
def test_out_of_range_values_are_config_errors_naming_the_key(schema, override, message):
    from classification.config import Config
    from detection.config import DetectionConfig
    from segmentation.config import SegmentationConfig

    cls = {"classification": Config, "segmentation": SegmentationConfig, "detection": DetectionConfig}[schema]
    with pytest.raises(ConfigError, match=message):
        load_config(None, cls, [override])
