"""Configs: YAML + overrides -> typed dataclasses (shapeflow.config), strict errors, presets, and the
experiment files of the training engine (shapeflow.train.experiment) with their JSON round trip."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from shapeflow.config import ConfigError, from_dict, preset, to_dict
from shapeflow.train.experiment import (
    ExperimentConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    load_resolved,
    save_resolved,
)
from shapeflow.train.task_toy import ToyDataConfig, ToyModelConfig

TOY_PRESETS = ToyModelConfig.PRESETS

TOY_YAML = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_toy_yaml_loads_with_preset_and_types():
    cfg = load_config(TOY_YAML)
    assert isinstance(cfg, ExperimentConfig) and cfg.task == "toy"
    assert isinstance(cfg.model, ToyModelConfig) and isinstance(cfg.data, ToyDataConfig)
    assert isinstance(cfg.train, TrainConfig)
    # preset "tiny" expanded, then the file's own model keys
    tiny = TOY_PRESETS["tiny"]
    assert cfg.model.hidden == tiny["hidden"] and cfg.model.depth == tiny["depth"]
    assert cfg.model.in_dim == 8
    assert cfg.train.lr == 3.0e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.99) and isinstance(cfg.train.betas, tuple)
    assert cfg.out_dir == "runs/toy"


def test_overrides_and_precedence(tmp_path):
    p = write(tmp_path, "task: toy\nmodel: {preset: tiny, depth: 3}\ntrain: {lr: 1e-3}\n")
    cfg = load_config(p)
    assert cfg.model.depth == 3 and cfg.model.hidden == TOY_PRESETS["tiny"]["hidden"]  # file beats preset
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # "1e-3" without a dot is a float
    assert cfg.out_dir == "runs/exp"  # default: runs/<stem>
    cfg = load_config(p, ["model.depth=5", "train.lr=3e-4", "train.betas=[0.9, 0.95]", "train.grad_clip=null",
                          "train.steps=7", "train.ema=false", "out_dir=runs/x", "train.precision=bf16",
                          "model.preset=small"])
    assert cfg.model.depth == 5  # override beats file
    assert cfg.model.hidden == TOY_PRESETS["small"]["hidden"]  # preset changed from the command line
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.95) and cfg.train.grad_clip is None
    assert cfg.train.steps == 7 and cfg.train.ema is False and cfg.out_dir == "runs/x"
    assert cfg.train.precision == "bf16"
    cfg = load_config(p, ["train.lr=1"])  # ints are accepted for floats
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(tmp_path, "task: toy\nmodel:\n  hiden: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: model.hiden: unknown key (did you mean hidden?)"
    p2 = write(tmp_path, "task: toy\ntrian: {steps: 3}\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml: trian: unknown key \(did you mean train\?\)"):
        load_config(p2)


def test_unknown_key_in_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TOY_YAML, ["train.lrr=3e-4"])
    msg = str(e.value)
    assert "override 'train.lrr=3e-4'" in msg and "train.lrr: unknown key (did you mean lr?)" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(TOY_YAML, ["train.lr"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("train: {steps: ten}", r"train.steps: expected int, got str 'ten'"),
        ("train: {steps: 1.5}", r"train.steps: expected int, got float 1.5"),
        ("train: {steps: true}", r"train.steps: expected int, got bool True"),
        ("train: {lr: fast}", r"train.lr: expected float, got str 'fast'"),
        ("train: {ema: 1}", r"train.ema: expected bool"),
        ("train: {betas: [0.9]}", r"train.betas: expected 2 items"),
        ("train: {betas: 0.9}", r"train.betas: expected a list"),
        ("train: {precision: fp16}", r"train.precision: 'fp16' is not one of 'auto', 'fp32', 'bf16'"),
        ("train: {grad_clip: big}", r"train.grad_clip: expected float"),
        ("train: {batch_size: 0}", r"train.batch_size: must be >= 1"),
        ("model: 3", r"model: expected a mapping"),
        ("model: {preset: huge}", r"model.preset: unknown preset 'huge' for ToyModelConfig \(known: tiny, small\)"),
        ("out_dir: 3", r"out_dir: expected str"),
    ],
)
def test_wrong_types_are_errors_at_load(tmp_path, text, match):
    p = write(tmp_path, "task: toy\n" + text + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


def test_override_type_errors_and_str_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train.steps=abc': train.steps: expected int"):
        load_config(TOY_YAML, ["train.steps=abc"])
    # a str field keeps the raw text, even when it looks like a number
    cfg = load_config(TOY_YAML, ["out_dir=123"])
    assert cfg.out_dir == "123"


def test_task_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"task: unknown task 'nope' \(known: .*toy"):
        load_config(write(tmp_path, "task: nope\n"))
    with pytest.raises(ConfigError, match=r"task: missing required key"):
        load_config(write(tmp_path, "model: {}\n", "c.yaml"))
    with pytest.raises(ConfigError, match=r"d.yaml: invalid YAML \(line \d+\)"):
        load_config(write(tmp_path, "task: toy\nmodel: {a: [\n", "d.yaml"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_round_trip(tmp_path):
    cfg = load_config(TOY_YAML, ["train.betas=[0.8, 0.9]", "model.preset=small", "train.grad_clip=null"])
    save_resolved(cfg, tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) == {"task", "model", "data", "objective", "train", "out_dir"}
    assert raw["objective"] is None  # the toy task has no objective section
    # the preset is expanded into explicit fields
    assert raw["model"] == {"in_dim": 8, "hidden": 32, "depth": 2, "out_dim": 1, "dropout": 0.0}
    assert raw["train"]["betas"] == [0.8, 0.9]
    back = load_resolved(tmp_path / "config.json")
    assert back == cfg and to_dict(back) == raw
    assert back.train.betas == (0.8, 0.9)


def test_resolved_missing_key_takes_default_with_log(tmp_path, caplog):
    raw = to_dict(load_config(TOY_YAML))
    del raw["train"]["keep_last"]
    with caplog.at_level(logging.INFO, logger="shapeflow.config"):
        cfg = config_from_dict(raw, "old/config.json")
    assert cfg.train.keep_last == TrainConfig().keep_last
    assert any("train.keep_last missing" in r.getMessage() for r in caplog.records)
    raw["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"old/config.json: train.bogus: unknown key"):
        config_from_dict(raw, "old/config.json")


@dataclass(frozen=True)
class _Inner:
    k: int = 1


@dataclass(frozen=True)
class _AllTypes:
    a: int
    b: float = 0.5
    c: Optional[int] = None
    d: tuple[int, ...] = ()
    e: list[str] = field(default_factory=list)
    f: dict[str, float] = field(default_factory=dict)
    g: Literal["x", "y"] = "x"
    h: _Inner = field(default_factory=_Inner)
    i: int | str = 0


def test_from_dict_supported_types():
    obj = from_dict(_AllTypes, {"a": 1, "b": 2, "c": 3, "d": [1, 2, 3], "e": ["p"], "f": {"w": 1},
                                "g": "y", "h": {"k": 5}, "i": "name"})
    assert obj == _AllTypes(a=1, b=2.0, c=3, d=(1, 2, 3), e=["p"], f={"w": 1.0}, g="y", h=_Inner(5), i="name")
    assert isinstance(obj.b, float) and isinstance(obj.f["w"], float)
    assert from_dict(_AllTypes, {"a": 1, "c": None}).c is None
    with pytest.raises(ConfigError, match=r"src: m.a: missing required key"):
        from_dict(_AllTypes, {}, "src", prefix="m")
    with pytest.raises(ConfigError, match=r"src: h.kk: unknown key \(did you mean k\?\)"):
        from_dict(_AllTypes, {"a": 1, "h": {"kk": 1}}, "src")
    with pytest.raises(ConfigError, match=r"src: d\[1\]: expected int"):
        from_dict(_AllTypes, {"a": 1, "d": [1, "z"]}, "src")
    with pytest.raises(ConfigError, match=r"src: i: expected "):
        from_dict(_AllTypes, {"a": 1, "i": 1.5}, "src")


def test_objective_section_rejected_for_task_without_one():
    with pytest.raises(ConfigError, match="objective"):
        load_config(TOY_YAML, ["objective.kl_weight=1e-3"])


def test_every_shipped_config_resolves():
    """The experiment files in configs/ and the demo's packaged ones parse and validate (typos fail here)."""
    repo = Path(__file__).resolve().parents[1]
    files = sorted((repo / "configs").glob("*.yaml"))
    assert len(files) >= 5
    for p in files:
        load_config(p)
    packaged = repo / "src" / "shapeflow" / "assets" / "configs"
    load_config(packaged / "demo_vecset_vae.yaml")
    cfg = load_config(packaged / "demo_token_dit.yaml", ["model.classes=[a, b]", "model.num_tokens=64"])
    assert (cfg.model.num_classes, cfg.model.num_tokens) == (2, 64)


def test_preset_is_expanded_in_one_place_for_every_config_class():
    """config.preset and a ``preset`` key of any mapping give the same config; the other keys win."""
    assert preset(ToyModelConfig, "tiny") == ToyModelConfig(**TOY_PRESETS["tiny"])
    assert preset(ToyModelConfig, "tiny", depth=4) == from_dict(ToyModelConfig, {"preset": "tiny", "depth": 4})
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'x' for ToyModelConfig"):
        preset(ToyModelConfig, "x")
    with pytest.raises(ConfigError, match=r"src: m.preset: unknown preset 'p' for _Inner \(known: none defined\)"):
        from_dict(_Inner, {"preset": "p"}, "src", prefix="m")
