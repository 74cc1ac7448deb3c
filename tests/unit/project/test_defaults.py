"""A default is written once: a config file that omits a key gets the dataclass field's value."""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib

import pytest

from fedpriv._config import field_default
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig, RoundConfig, SecAggConfig
from fedpriv.privacy import CentralDP, PrivacyBudget
from fedpriv.privacy.accounting import DEFAULT_DELTA

MODEL = '[model]\nfactory = "pkg.mod:make"\n'
DP = "[dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n"


def _coordinator(text: str) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict(tomllib.loads(text), base_dir=pathlib.Path("/etc/fed"))


def _fields(value: object, *, skip: tuple[str, ...] = ()) -> dict[str, object]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name not in skip}


def test_omitted_round_and_secagg_keys_get_the_dataclass_defaults():
    config = _coordinator("secure_aggregation = true\n" + MODEL)
    assert _fields(config.rounds) == _fields(RoundConfig())
    assert config.secure_aggregation is not None
    assert _fields(config.secure_aggregation) == _fields(SecAggConfig())
    assert config.federation == field_default(CoordinatorConfig, "federation")
    assert config.keep_checkpoints == field_default(CoordinatorConfig, "keep_checkpoints")


def test_omitted_dp_keys_get_central_dps_defaults():
    config = _coordinator(MODEL + DP)
    assert config.dp is not None
    # expected_clients defaults to rounds.min_clients, not to the field, by design.
    skip = ("noise_multiplier", "clip_norm", "expected_clients")
    assert _fields(config.dp, skip=skip) == _fields(
        CentralDP(noise_multiplier=1.0, clip_norm=1.0), skip=skip
    )
    assert config.dp.expected_clients == config.rounds.min_clients


def test_one_delta_everywhere():
    assert field_default(CentralDP, "delta") == DEFAULT_DELTA
    assert field_default(PrivacyBudget, "delta") == DEFAULT_DELTA
    client = ClientConfig.from_dict(
        tomllib.loads(
            '[coordinator]\naddress = "h:1"\n[privacy]\nepsilon = 3.0\nledger = "ledger.json"\n'
        ),
        base_dir=pathlib.Path("/etc/silo"),
    )
    assert client.budget is not None and client.budget.delta == DEFAULT_DELTA


def test_omitted_client_keys_get_the_dataclass_defaults():
    client = ClientConfig.from_dict(
        tomllib.loads('[coordinator]\naddress = "h:1"\n'), base_dir=pathlib.Path("/etc/silo")
    )
    assert _fields(client, skip=("coordinator",)) == _fields(
        ClientConfig(coordinator="h:1"), skip=("coordinator",)
    )


def test_a_field_without_a_plain_default_is_refused():
    with pytest.raises(TypeError, match="no plain default"):
        field_default(CentralDP, "clip_norm")
    with pytest.raises(TypeError, match="no plain default"):
        field_default(RoundConfig, "client_config")
