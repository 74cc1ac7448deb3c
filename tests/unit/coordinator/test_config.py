from __future__ import annotations

import pathlib
import tomllib

import pytest

from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig
from fedpriv.errors import ConfigError

GOOD = """
[federation]
name = "digits"
allowed_silos = ["a", "b"]
[server]
address = "0.0.0.0:7443"
[tls]
ca = "pki/ca.crt"
cert = "pki/c.crt"
key = "pki/c.key"
[rounds]
num_rounds = 4
min_clients = 2
deadline_s = 30
client_config = { epochs = 2, lr = 0.01 }
[model]
factory = "pkg.mod:make"
[store]
dir = "state"
"""


def parse(text: str) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict(tomllib.loads(text), base_dir=pathlib.Path("/etc/fed"))


def test_good_config_parses_with_paths_relative_to_the_file():
    config = parse(GOOD)
    assert config.rounds.num_rounds == 4 and config.rounds.deadline_s == 30.0
    assert config.allowed_silos == frozenset({"a", "b"})
    assert config.tls is not None and config.tls.ca == pathlib.Path("/etc/fed/pki/ca.crt")
    assert config.state_dir == pathlib.Path("/etc/fed/state")
    assert dict(config.rounds.client_config) == {"epochs": 2, "lr": 0.01}
    assert config.keep_checkpoints == 0  # every checkpoint is kept unless asked
    assert (
        parse(GOOD.replace('dir = "state"', 'dir = "state"\nkeep_checkpoints = 3')).keep_checkpoints
        == 3
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("num_rounds = 4", 'num_rounds = "4"'), "rounds.num_rounds: expected int, got str '4'"),
        (("num_rounds = 4", "num_rounds = 0"), "rounds.num_rounds = 0: must be >= 1"),
        (
            ("min_clients = 2", "min_clients = 2\nmin_clinets = 3"),
            "unknown key(s) in [rounds]: min_clinets",
        ),
        (("[store]", "[storage]"), "unknown key(s) in the top level: storage"),
        (('factory = "pkg.mod:make"', 'factory = "pkg.mod"'), "expected 'module:function'"),
        (
            ('factory = "pkg.mod:make"', 'factory = "pkg.mod:make"\nexchange = "bogus"'),
            "model.exchange = 'bogus': expected one of 'trainable', 'all'",
        ),
        (("deadline_s = 30", "deadline_s = -1"), "rounds.deadline_s = -1.0: must be > 0"),
        (('key = "pki/c.key"', ""), "[tls] is missing tls.key"),
        (('allowed_silos = ["a", "b"]', "allowed_silos = []"), "allowed_silos is empty"),
        (('allowed_silos = ["a", "b"]', 'allowed_silos = "a"'), "expected a list of strings"),
        (
            ("client_config = { epochs = 2, lr = 0.01 }", "client_config = { epochs = [2] }"),
            "client_config.epochs",
        ),
        (("min_clients = 2", "min_clients = 2\nmin_results = 3"), "rounds.min_results = 3"),
        (
            ('dir = "state"', 'dir = "state"\nkeep_checkpoints = -1'),
            "store.keep_checkpoints = -1: must be >= 0",
        ),
    ],
)
def test_bad_config_fails_naming_the_field(change, message):
    with pytest.raises(ConfigError) as caught:
        parse(GOOD.replace(*change))
    assert message in str(caught.value)


def test_client_config_requires_the_coordinator_address():
    with pytest.raises(ConfigError, match="coordinator.address is required"):
        ClientConfig.from_dict({"coordinator": {}}, base_dir=pathlib.Path("."))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[client\]: poll_wait"):
        ClientConfig.from_dict(
            {"coordinator": {"address": "h:1"}, "client": {"poll_wait": 3}},
            base_dir=pathlib.Path("."),
        )


def test_dp_table_turns_dp_fedavg_on_with_defaults_from_rounds():
    config = parse(
        GOOD + "[dp]\nnoise_multiplier = 1.1\nclip_norm = 0.5\nadaptive = true\n"
        "clipped_count_stddev = 1.0\n"
    )
    assert config.dp is not None
    assert (config.dp.noise_multiplier, config.dp.clip_norm, config.dp.adaptive) == (1.1, 0.5, True)
    assert config.dp.expected_clients == 2 and config.dp.delta == 1e-5
    assert parse(GOOD).dp is None
    assert parse(GOOD + "[dp]\nenabled = false\nnoise_multiplier = 1.0\nclip_norm = 1\n").dp is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[dp]\nclip_norm = 1.0\n", r"dp\.noise_multiplier is required"),
        (
            "[dp]\nnoise_multiplier = '1'\nclip_norm = 1.0\n",
            r"dp\.noise_multiplier: expected float",
        ),
        ("[dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\nclip = 2\n", r"unknown key.*\[dp\]: clip"),
    ],
)
def test_bad_dp_table_names_the_field(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse(GOOD + extra)


def test_update_compression_is_read_and_checked():
    assert (
        parse(
            GOOD.replace("[rounds]\n", '[rounds]\nupdate_compression = "int8"\n')
        ).rounds.update_compression.value
        == "int8"
    )
    with pytest.raises(
        ConfigError,
        match=r"rounds\.update_compression = 'int4': must be one of 'none', 'fp16', 'bf16', 'int8'",
    ):
        parse(GOOD.replace("[rounds]\n", '[rounds]\nupdate_compression = "int4"\n'))


def test_update_bounds_have_safe_defaults_and_are_read_and_checked():
    # Arrange: the defaults, whose product cannot overflow a float32 sum of many silos
    defaults = parse(GOOD).rounds
    assert defaults.max_update_value == 1e6 and defaults.max_num_examples == 10_000_000
    assert defaults.max_update_value * defaults.max_num_examples * 1e24 < 3.4e38
    # Act
    rounds = parse(
        GOOD.replace("[rounds]\n", "[rounds]\nmax_update_value = 100\nmax_num_examples = 5000\n")
    ).rounds
    # Assert
    assert rounds.max_update_value == 100.0 and rounds.max_num_examples == 5000
    for line, message in (
        ("max_update_value = 0", "rounds.max_update_value = 0.0: must be in (0, 3.40282e+38]"),
        ("max_update_value = 1e39", "rounds.max_update_value = 1e+39: must be in (0,"),
        ("max_update_value = nan", "rounds.max_update_value = nan: must be in (0,"),
        ("max_num_examples = 0", "rounds.max_num_examples = 0: must be in [1, 2**53]"),
        ("max_num_examples = 9007199254740993", "must be in [1, 2**53]"),
        ('max_num_examples = "10"', "rounds.max_num_examples: expected int, got str"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse(GOOD.replace("[rounds]\n", f"[rounds]\n{line}\n"))
        assert message in str(caught.value)


def test_prometheus_address_is_checked():
    assert parse(GOOD + '[metrics]\nprometheus = "0.0.0.0:9464"\n').prometheus == "0.0.0.0:9464"
    with pytest.raises(
        ConfigError, match=r"metrics\.prometheus = 'localhost': expected 'host:port'"
    ):
        parse(GOOD + '[metrics]\nprometheus = "localhost"\n')


def test_crl_defaults_to_ca_crl_beside_the_ca_certificate():
    config = parse(GOOD)
    assert config.tls is not None and config.tls.crl is None
    assert config.tls.crl_path == pathlib.Path("/etc/fed/pki/ca.crl")


def test_crl_path_is_read_relative_to_the_config_file():
    config = parse(GOOD.replace('key = "pki/c.key"', 'key = "pki/c.key"\ncrl = "revoked.crl"'))
    assert config.tls is not None and config.tls.crl == pathlib.Path("/etc/fed/revoked.crl")
    assert config.tls.crl_path == pathlib.Path("/etc/fed/revoked.crl")


def test_a_misspelt_required_key_is_named():
    with pytest.raises(ConfigError, match=r"address is required \('adress' is not a known key"):
        ClientConfig.from_dict({"coordinator": {"adress": "h:1"}}, base_dir=pathlib.Path("."))


def test_an_unknown_key_names_the_closest_allowed_one():
    with pytest.raises(ConfigError, match=r"num_round \(did you mean 'num_rounds'\?\)"):
        parse(GOOD.replace("num_rounds = 4", "num_round = 4"))


def test_a_secagg_table_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match=r"\[secagg\] is set but secure aggregation is off"):
        parse("[secagg]\nthreshold = 2\n" + GOOD)
    assert parse("secure_aggregation = false\n" + GOOD).secure_aggregation is None


def test_retry_backoff_is_read_and_checked():
    assert parse(GOOD).rounds.retry_backoff_s == 5.0
    assert (
        parse(
            GOOD.replace("deadline_s = 30", "deadline_s = 30\nretry_backoff_s = 0")
        ).rounds.retry_backoff_s
        == 0
    )
    with pytest.raises(ConfigError, match="retry_backoff_s"):
        parse(GOOD.replace("deadline_s = 30", "deadline_s = 30\nretry_backoff_s = -1"))


def test_every_problem_in_a_coordinator_config_is_named_in_one_error():
    # Arrange: a wrong type, a value out of range, a typo in two tables
    text = (
        GOOD.replace("num_rounds = 4", 'num_rounds = "4"')
        .replace("deadline_s = 30", "deadline_s = -1")
        .replace("min_clients = 2", "min_clients = 2\nmin_clinets = 3")
        .replace('dir = "state"', 'dir = "state"\nkeep_chekpoints = 3')
    )
    # Act
    with pytest.raises(ConfigError) as caught:
        parse(text)
    # Assert: all four, one per line, the typos with the key they were meant to be
    message = str(caught.value)
    assert message.startswith("4 problems in the config:\n"), message
    lines = message.splitlines()[1:]
    assert lines == [
        "  - rounds.num_rounds: expected int, got str '4'",
        "  - rounds.deadline_s = -1.0: must be > 0",
        lines[2],
        lines[3],
    ]
    assert "unknown key(s) in [rounds]: min_clinets (did you mean 'min_clients'?)" in lines[2]
    assert (
        "unknown key(s) in [store]: keep_chekpoints (did you mean 'keep_checkpoints'?)"
        in (lines[3])
    )


def test_a_config_that_stops_at_a_missing_key_still_names_the_problems_before_it():
    with pytest.raises(ConfigError) as caught:
        ClientConfig.from_dict(
            {"coordinator": {"adress": "h:1"}, "privacy": {"epsilon": "3"}},
            base_dir=pathlib.Path("."),
        )
    message = str(caught.value)
    assert message.startswith("2 problems in the config:\n"), message
    assert "privacy.epsilon: expected float, got str '3'" in message
    assert "coordinator.address is required ('adress' is not a known key" in message


def test_one_problem_reads_as_before():
    with pytest.raises(ConfigError) as caught:
        parse(GOOD.replace("num_rounds = 4", 'num_rounds = "4"'))
    assert str(caught.value) == "rounds.num_rounds: expected int, got str '4'"
