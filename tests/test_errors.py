"""Bad inputs a new user meets stop the entry point with one line that names the setting and what to do.

Each run below fails in its checks before any network loads or compiles (a few seconds, most of it
importing JAX): exit status 2, no traceback, and stderr's last line ``jdistill: error: ...`` naming the
setting. The checks themselves are also called in-process, where they are cheaper to vary.
"""

from __future__ import annotations

import os
import subprocess

import jax
import ml_collections
import pytest
from helpers import SMALL, run_main

from jdistill import main as entry
from jdistill import parallel, paths, preflight
from jdistill.configuration import ConfigError
from jdistill.data.text import check_prompt_table

DIGITS = "configs/swiftbrush.py"  # the shipped digits teacher: a real pipeline directory, built-in prompts
SD15 = "configs/swiftbrush.py:sd15"
SHIPPED_TEACHER = "jdistill/assets/digits/teacher"


def _error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line error of a failed run; checks status 2, no traceback and that it names ``needles``."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("jdistill: error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


# ------------------------------------------------------------------------------------------ entry point


def test_mesh_that_does_not_fit_the_devices(tmp_path):
    one = run_main(tmp_path / "w", overrides=[*SMALL, ("mesh.fsdp", "2")], timeout=120)
    _error_line(one, "mesh.fsdp=2", "1 device(s)", "divisor of 1")
    four = run_main(
        tmp_path / "w4",
        overrides=[("mesh.num_devices", "-1"), ("mesh.data", "3")],
        num_devices=4,
        timeout=120,
    )
    _error_line(four, "mesh.data=3 x mesh.fsdp=1 = 3 devices", "4 device(s)", "mesh.data=-1")
    # A failed run leaves no empty run directory behind.
    assert not (tmp_path / "w").exists() and not (tmp_path / "w4").exists()


def test_teacher_path_that_does_not_exist(tmp_path, monkeypatch):
    missing = str(tmp_path / "no" / "sd15")
    (tmp_path / "runs").mkdir()
    result = run_main(
        tmp_path / "runs" / "a" / "w", spec=SD15, overrides=[("teacher.path", missing)], timeout=120
    )
    last = _error_line(result, f"teacher.path='{missing}'", "does not exist", "Hugging Face cache")
    assert list((tmp_path / "runs").iterdir()) == []  # the folders the run made are gone, the others stay
    assert "hub" in last and len(last) < 400
    # A hub id that is not cached, without network: said before any download is tried.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = run_main(
        tmp_path / "w", spec=SD15, overrides=[("teacher.path", "nobody/no-such-model")], timeout=120
    )
    _error_line(
        offline,
        "teacher.path='nobody/no-such-model'",
        "not in the local Hugging Face cache",
        "HF_HUB_OFFLINE",
    )


def test_missing_and_empty_prompts(tmp_path):
    missing = str(tmp_path / "prompts.txt")
    result = run_main(tmp_path / "w", spec=DIGITS, overrides=[("teacher.prompts", missing)], timeout=120)
    _error_line(result, f"teacher.prompts='{missing}'", "does not exist", ".txt (one prompt per line)")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    result = run_main(tmp_path / "w", spec=DIGITS, overrides=[("teacher.prompts", str(empty))], timeout=120)
    _error_line(result, "teacher.prompts=", "holds no prompts")
    # A UNet teacher without built-in prompts needs a table.
    result = run_main(tmp_path / "w", spec=SD15, overrides=[("teacher.path", SHIPPED_TEACHER)], timeout=120)
    _error_line(result, "teacher.prompts is empty")


def test_unwritable_workdir(tmp_path):
    occupied = tmp_path / "file"
    occupied.write_text("not a directory")
    _error_line(run_main(occupied, timeout=120), f"--workdir={occupied}", "is a file")
    _error_line(run_main(occupied / "run", timeout=120), f"--workdir={occupied / 'run'}", "cannot create")


def test_bad_config_key_preset_and_mode(tmp_path):
    key = run_main(tmp_path / "w", overrides=[("method.guidance_scal", "2")], timeout=120)
    _error_line(key, "unknown config key 'method.guidance_scal'", "did you mean 'guidance_scale'")
    preset = run_main(tmp_path / "w", spec="configs/swiftbrush.py:nope", timeout=120)
    _error_line(preset, "unknown preset 'nope'", "gmm")
    mode = run_main(tmp_path / "w", flags=["--mode=trian"], timeout=120)
    _error_line(mode, "--mode", "trian")
    _error_line(
        run_main(tmp_path / "w", overrides=[("num_steps", "0")], timeout=120), "'num_steps' must be positive"
    )


def test_other_modes_need_a_run(tmp_path):
    result = run_main(tmp_path / "nothing", flags=["--mode=sample"], timeout=120)
    _error_line(
        result, f"--workdir={tmp_path / 'nothing'} does not exist: no run, no checkpoint", "--mode train"
    )
    assert not (tmp_path / "nothing").exists()


def test_traceback_on_request(tmp_path):
    overrides = [*SMALL, ("mesh.fsdp", "2")]
    result = run_main(tmp_path / "w", overrides=overrides, env={entry.TRACEBACK_ENV: "1"}, timeout=120)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("jdistill: error: mesh.fsdp=2")


# ------------------------------------------------------------------------------------------------ in-process


def _mesh(data=-1, fsdp=1, num_devices=-1):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "num_devices": num_devices})


def test_mesh_errors_name_the_settings():
    assert len(jax.devices()) == 8  # conftest's fake devices
    assert parallel.make_mesh(_mesh(fsdp=4)).shape == {"data": 2, "fsdp": 4}
    cases = {
        "mesh.fsdp=3 does not divide the 8 device(s) in use; set mesh.fsdp to a divisor of 8": _mesh(fsdp=3),
        "mesh.fsdp=0 must be at least 1": _mesh(fsdp=0),
        "mesh.data=3 x mesh.fsdp=2 = 6 devices, but there are 8 device(s) in use": _mesh(data=3, fsdp=2),
        "mesh.num_devices=9, but only 8 device(s) exist": _mesh(num_devices=9),
        "mesh.fsdp=2 does not divide the 1 device(s) in use (mesh.num_devices=1)": _mesh(
            fsdp=2, num_devices=1
        ),
    }
    for message, cfg in cases.items():
        with pytest.raises(ConfigError) as err:
            parallel.make_mesh(cfg)
        assert message in str(err.value)
        assert isinstance(err.value, ValueError)  # callers that caught the old ValueError still do


def test_workdir_checks(tmp_path, monkeypatch):
    preflight.check_workdir(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")  # probe removed
    with pytest.raises(ConfigError, match="does not exist: no run, no checkpoint to read; --mode eval reads"):
        preflight.check_workdir(str(tmp_path / "other"), "eval")
    # A directory nothing may be created or written in, whoever runs the tests (root ignores file modes).
    locked = tmp_path / "locked"
    locked.mkdir()
    cls = type(paths.as_path(str(locked)))
    mkdir, write_text = cls.mkdir, cls.write_text

    def denied_in_locked(real):
        def method(self, *args, **kwargs):
            if str(self.parent) == str(locked):
                raise PermissionError(13, "Permission denied")
            return real(self, *args, **kwargs)

        return method

    monkeypatch.setattr(cls, "mkdir", denied_in_locked(mkdir))
    monkeypatch.setattr(cls, "write_text", denied_in_locked(write_text))
    with pytest.raises(
        ConfigError, match=r"--workdir=.*locked/run: cannot create the directory \(Permission"
    ):
        preflight.check_workdir(str(locked / "run"))
    with pytest.raises(ConfigError, match=r"--workdir=.*locked: cannot write in the directory \(Permission"):
        preflight.check_workdir(str(locked))


def test_teacher_source_checks(tmp_path, monkeypatch):
    def teacher(**t):
        base = {"kind": "diffusers", "preset": "sd15", "path": "", "prompts": ""}
        return ml_collections.ConfigDict({"teacher": {**base, **t}})

    preflight.check_teacher_source(teacher(path=SHIPPED_TEACHER))  # a pipeline directory
    preflight.check_teacher_source(teacher(kind="gmm", path="/nowhere"))  # no pipeline: not checked
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for path in ("/nowhere/sd15", "./sd15", "models/sd15", "sd15", "a/b/c"):
        with pytest.raises(
            ConfigError, match=r"does not exist and is not a hub id in the local Hugging Face"
        ):
            preflight.check_teacher_source(teacher(path=path))
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ConfigError, match="that is a file"):
        preflight.check_teacher_source(teacher(path="weights.safetensors"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    preflight.check_teacher_source(teacher(path="owner/model"))  # a hub id: the loader may download it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match=r"teacher.path is empty and preset 'sd15' reads '.*'.*HF_HUB_OFFLINE"
    ):
        preflight.check_teacher_source(teacher())


def test_prompt_table_checks(tmp_path):
    table = tmp_path / "p.txt"
    table.write_text("\n\na red 3\n")
    check_prompt_table(str(table))
    table.write_text("")
    with pytest.raises(ValueError, match=r"p\.txt holds no prompts"):
        check_prompt_table(str(table))
    with pytest.raises(FileNotFoundError, match=r"q\.jsonl does not exist"):
        check_prompt_table(str(tmp_path / "q.jsonl"))
    config = ml_collections.ConfigDict(
        {"teacher": {"kind": "digits", "preset": "digits", "prompts": "", "eval_prompts": str(table)}}
    )
    with pytest.raises(
        ConfigError, match=r"teacher\.eval_prompts='.*p\.txt': .*holds no prompts.*; give a prompt"
    ):
        preflight.check_prompts(config)


def test_named_paths_checks(tmp_path):
    config = ml_collections.ConfigDict(
        {
            "teacher": {"kind": "digits", "data": str(tmp_path / "images")},
            "method": {"name": "dmd", "pairs": ""},
        }
    )
    with pytest.raises(ConfigError, match=r"teacher\.data='.*images' does not exist; give real images"):
        preflight.check_named_paths(config)
    (tmp_path / "images").mkdir()
    preflight.check_named_paths(config)
    config.method.pairs = str(tmp_path / "pairs")
    with pytest.raises(ConfigError, match=r"method\.pairs=.* tools/make_ode_pairs\.py wrote"):
        preflight.check_named_paths(config)
    config.method.pairs = str(tmp_path / "pairs-*")  # a glob: its reader says when it matches nothing
    preflight.check_named_paths(config)


def test_one_line_messages():
    err = ConfigError("first line\n  second line\n")
    assert entry.one_line(err) == "first line second line"
    missing = FileNotFoundError(2, "No such file or directory", "/x/vocab.json")
    assert entry.one_line(missing) == "[Errno 2] No such file or directory: '/x/vocab.json'"
    assert ValueError not in entry.user_errors()  # a ValueError that is not a ConfigError is a bug: traceback


def test_method_settings_are_checked_by_their_method(tmp_path):
    """A method's own choices (its module's CONFIG_CHOICES) are checked when the config loads, and a value its
    build refuses stops in one line as well, before anything compiles."""
    from helpers import load

    for spec, key in (
        ("configs/swiftbrush.py:gmm", "method.fake_score_init"),
        ("configs/meanflow.py:gmm", "method.tangent"),
        ("configs/dmd2.py:gmm", "method.gan.loss"),
        ("configs/lcm.py:gmm", "method.target_network"),
    ):
        with pytest.raises(ConfigError, match=rf"'{key}' has value 'bogus'; valid choices"):
            load(spec, [(key, "bogus")])
    chosen = run_main(tmp_path / "w", overrides=[("method.fake_score_init", "bogus")], timeout=120)
    _error_line(chosen, "'method.fake_score_init' has value 'bogus'", "teacher_residual")
    built = run_main(
        tmp_path / "w2",
        spec="configs/lcm.py:gmm",
        overrides=[("method.num_ddim_timesteps", "0")],
        timeout=120,
    )
    _error_line(built, "method 'lcm'", "method.num_ddim_timesteps must be an integer in [1, 1000]")
