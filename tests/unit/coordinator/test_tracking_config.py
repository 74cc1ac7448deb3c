"""The [tracking] table: sinks, paths relative to the config file, typos, missing packages."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest

from fedpriv.coordinator import CoordinatorConfig
from fedpriv.coordinator.tracking import MlflowSettings, TrackingConfig
from fedpriv.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = '[model]\nfactory = "pkg.mod:make"\n'
MLFLOW = '[tracking.mlflow]\ntracking_uri = "file:./mlruns"\n'
TENSORBOARD = '[tracking.tensorboard]\nlog_dir = "tb"\n'


def parse(text: str) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict(tomllib.loads(text), base_dir=pathlib.Path("/etc/fed"))


def test_no_tracking_table_means_no_sinks():
    config = parse(MODEL)
    assert config.tracking == TrackingConfig()
    assert not config.tracking.enabled


def test_both_sinks_parse_with_paths_relative_to_the_config_file():
    config = parse(
        MODEL + MLFLOW + 'experiment = "hospitals"\nrun_name = "trial-3"\n' + TENSORBOARD
    )
    mlflow, tensorboard = config.tracking.mlflow, config.tracking.tensorboard
    assert mlflow == MlflowSettings(
        tracking_uri="file:///etc/fed/mlruns", experiment="hospitals", run_name="trial-3"
    )
    assert tensorboard is not None and tensorboard.log_dir == pathlib.Path("/etc/fed/tb")


def test_omitted_mlflow_keys_get_the_dataclass_defaults_and_other_uris_pass_through():
    config = parse(MODEL + '[tracking.mlflow]\ntracking_uri = "https://mlflow.example:5000"\n')
    assert config.tracking.mlflow == MlflowSettings(tracking_uri="https://mlflow.example:5000")
    assert config.tracking.tensorboard is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MLFLOW.replace("[tracking.mlflow]", "[tracking.mlfow]"),
            "unknown key(s) in [tracking]: mlfow (did you mean 'mlflow'?)",
        ),
        (
            MLFLOW + 'experimnt = "x"\n',
            "unknown key(s) in [tracking.mlflow]: experimnt (did you mean 'experiment'?)",
        ),
        (
            '[tracking.tensorboard]\nlogdir = "tb"\n',
            "tracking.tensorboard.log_dir is required",
        ),
        (
            TENSORBOARD + 'log_dri = "x"\n',
            "unknown key(s) in [tracking.tensorboard]: log_dri (did you mean 'log_dir'?)",
        ),
        ('[tracking.mlflow]\nexperiment = "x"\n', "tracking.mlflow.tracking_uri is required"),
        ("[tracking.mlflow]\ntracking_uri = 3\n", "tracking.mlflow.tracking_uri: expected str"),
        ('[tracking.mlflow]\ntracking_uri = " "\n', "tracking_uri is empty"),
        ('[tracking]\nmlflow = "file:./mlruns"\n', "[tracking.mlflow] must be a table"),
    ],
)
def test_a_bad_tracking_table_fails_naming_the_key(text, message):
    with pytest.raises(ConfigError) as caught:
        parse(MODEL + text)
    assert message in str(caught.value)


@pytest.mark.parametrize(("table", "package"), [(MLFLOW, "mlflow"), (TENSORBOARD, "tensorboard")])
def test_a_sink_without_its_package_names_the_extra(monkeypatch, table, package):
    # An entry of None in sys.modules makes the package unimportable, as if not installed.
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ConfigError) as caught:
        parse(MODEL + table)
    message = str(caught.value)
    assert f"needs the {package!r} package" in message
    assert "pip install 'fedpriv[tracking]'" in message


def test_the_base_install_imports_no_tracking_package():
    code = (
        "import sys, fedpriv.coordinator, fedpriv.cli.main, fedpriv.coordinator.tracking; "
        "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_the_documented_tracking_table_parses():
    text = (ROOT / "docs" / "tracking.md").read_text()
    [block] = [b.split("\n", 1)[1] for b in text.split("```toml")[1:]]
    config = parse(MODEL + block.split("```", 1)[0])
    assert config.tracking.mlflow is not None and config.tracking.tensorboard is not None
    assert config.tracking.mlflow.tracking_uri == "file:///etc/fed/mlruns"
