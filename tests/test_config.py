"""Config files, presets, overrides and their error messages."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, load, run_main

from jdistill import configuration
from jdistill.configuration import ConfigError, apply_override, split_config_args

RECIPES = ["configs/swiftbrush.py:gmm", "configs/sft.py:gmm", "configs/sft.py:gmm_flow"]


@pytest.mark.parametrize("spec", RECIPES)
def test_presets_load_and_validate(spec):
    cfg = load(spec)
    assert cfg.method.name in spec
    json.loads(configuration.to_json(cfg))  # the resolved config is JSON


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown preset 'sdxx'.*\['digits', 'gmm', 'sd21base', 'sd15', 'sdxl', 'flux_dev', .*'sd35_large'\]",
    ):
        load("configs/swiftbrush.py:sdxx")


def test_override_parsing_by_type():
    cfg = load("configs/swiftbrush.py:gmm")
    apply_override(cfg, "num_steps", "7")
    apply_override(cfg, "method.guidance_scale", "2.5")
    apply_override(cfg, "progress_bar", "false")
    apply_override(cfg, "method.t_range", "(0.1, 0.9)")
    apply_override(cfg, "teacher.schedule.kind", "flow")
    assert (cfg.num_steps, cfg.method.guidance_scale, cfg.progress_bar) == (7, 2.5, False)
    assert cfg.method.t_range == (0.1, 0.9)
    assert cfg.teacher.schedule.kind == "flow"


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "method.guidance_scal",
            "2",
            r"unknown config key 'method.guidance_scal' \(did you mean 'guidance_scale'\?\)",
        ),
        ("nets.student.lr", "1", r"unknown config key 'nets'.*valid keys at the top level"),
        ("networks.student.optimizer.lrr", "1", r"valid keys under 'networks.student.optimizer': \[.*'lr'"),
        ("num_steps", "ten", r"'num_steps' expects an integer, got 'ten'"),
        ("progress_bar", "maybe", r"expects a boolean"),
        ("method", "x", r"'method' is a section"),
    ],
)
def test_bad_overrides_name_the_key(key, value, message):
    cfg = load("configs/swiftbrush.py:gmm")
    with pytest.raises(ConfigError, match=message):
        apply_override(cfg, key, value)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "method.cfg_convention",
            "both",
            r"'method.cfg_convention' has value 'both'; valid choices: \['uncond', 'cond'\]",
        ),
        ("teacher.kind", "sd99", r"'teacher.kind' has value 'sd99'; valid choices"),
        ("networks.student.prediction", "noise", r"valid choices: \['eps', 'x0', 'v', 'velocity'\]"),
        ("networks.student.optimizer.name", "sgdd", r"optimizer.name' has value 'sgdd'"),
        ("method.name", "dmd9", r"'method.name' has value 'dmd9'"),
        ("num_steps", "0", r"'num_steps' must be positive"),
    ],
)
def test_bad_values_name_the_key_and_choices(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load("configs/swiftbrush.py:gmm", [(key, value)])


def test_loaded_config_is_locked():
    cfg = load("configs/swiftbrush.py:gmm")
    with pytest.raises(AttributeError):
        cfg.new_key = 1


def test_split_config_args_forms():
    spec, overrides, rest = split_config_args(
        [
            "--config=a.py:gmm",
            "--config.x=1",
            "--config.y",
            "2",
            "--config.flag",
            "--noconfig.other",
            "--workdir=w",
        ]
    )
    assert spec == "a.py:gmm"
    assert overrides == [("x", "1"), ("y", "2"), ("flag", "true"), ("other", "false")]
    assert rest == ["--workdir=w"]
    with pytest.raises(ConfigError, match="before --config"):
        split_config_args(["--config.x=1", "--config=a.py"])


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = run_main(tmp_path / "w", overrides=[("method.guidance_scal", "2")], timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'method.guidance_scal'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_main(tmp_path / "w", spec="configs/nope.py:gmm", timeout=120)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert not (REPO / "nope").exists()
