"""A silo never helps the coordinator learn both secrets of one peer.

The coordinator collects t seed shares of a silo when it calls that silo a
survivor, and t mask-key shares when it calls it dropped. Each silo answers one
reveal request, for a roster that names no silo both ways. The coordinator can
still tell different silos different rosters; with t > n/2 it would need 2t > n
distinct silos for both secrets, so the split-roster attack runs out of silos.
"""

from __future__ import annotations

import itertools
import pathlib

import pytest

from fedpriv.coordinator import CoordinatorConfig, ModelSource, RoundConfig, SecAggConfig
from fedpriv.errors import ConfigError, ProtocolError
from fedpriv.secagg import ClientSession, ServerSession, client, shamir


def exchanged(n: int, threshold: int) -> dict[str, ClientSession]:
    """n sessions that advertised keys and exchanged shares (the coordinator's relay)."""
    names = [f"silo-{i}" for i in range(n)]
    sessions = {
        name: ClientSession(silo=name, session="s", round=1, threshold=threshold) for name in names
    }
    keys = {name: s.advertise() for name, s in sessions.items()}
    for s in sessions.values():
        s.set_peers(keys)
    outgoing = {name: s.share() for name, s in sessions.items()}
    for name, s in sessions.items():
        s.receive({sender: out[name] for sender, out in outgoing.items() if sender != name})
    return sessions


def split_roster_attack(
    sessions: dict[str, ClientSession], target: str, told_dropped: set[str]
) -> tuple[bytes | None, bytes | None]:
    """Tell `told_dropped` that `target` dropped and everyone else that it survived.

    Then ask every silo once more, with the opposite roster. Returns the target's
    seed and mask key where t shares of each were collected (None where not).
    """
    names = sorted(sessions)
    seeds: dict[int, bytes] = {}
    keys: dict[int, bytes] = {}
    rosters = {
        True: (names, []),  # the target survived
        False: ([n for n in names if n != target], [target]),  # the target dropped
    }
    for asked_first in (True, False):
        for name, session in sessions.items():
            survived = (name not in told_dropped) == asked_first
            if name == target and not survived:
                continue  # a silo is never asked to call itself dropped: it would refuse
            alive, gone = rosters[survived]
            try:
                revealed_seeds, revealed_keys = session.reveal(survivors=alive, dropped=gone)
            except ProtocolError:
                continue
            seeds.update({x: y for owner, x, y in revealed_seeds if owner == target})
            keys.update({x: y for owner, x, y in revealed_keys if owner == target})
    threshold = sessions[target].threshold

    def recover(points: dict[int, bytes]) -> bytes | None:
        if len(points) < threshold:
            return None
        return shamir.combine(sorted(points.items()), threshold=threshold)

    return recover(seeds), recover(keys)


@pytest.mark.parametrize(("n", "threshold"), [(3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_with_a_majority_threshold_no_split_roster_yields_both_secrets_of_a_silo(n, threshold):
    target = "silo-0"
    others = [f"silo-{i}" for i in range(1, n)]
    for size in range(len(others) + 1):
        for told_dropped in itertools.combinations(others, size):
            # Arrange: fresh sessions for every try (a session answers once)
            sessions = exchanged(n, threshold)
            # Act
            seed, key = split_roster_attack(sessions, target, set(told_dropped))
            # Assert: at most one of the two secrets is ever reconstructed
            assert seed is None or key is None, told_dropped
            if seed is not None:
                assert seed == sessions[target]._seed  # test-only peek: the real secret


def test_with_the_old_rules_and_half_the_silos_as_threshold_the_split_roster_attack_works(
    monkeypatch,
):
    # Arrange: t = 2 of 4, accepted before (only t <= n was checked)
    def old_rule(*, silos: int, threshold: int) -> None:
        if silos < threshold:
            raise ProtocolError("too few silos")

    monkeypatch.setattr(client, "_check_threshold", old_rule)
    sessions = exchanged(4, 2)
    # Act: silo-1 hears that silo-0 survived, silo-2 and silo-3 that it dropped
    seed, key = split_roster_attack(sessions, "silo-0", {"silo-2", "silo-3"})
    # Assert: both secrets of silo-0, so its masked update would lie open
    assert seed == sessions["silo-0"]._seed
    assert key == sessions["silo-0"]._mask.private_bytes


@pytest.mark.parametrize(("n", "threshold"), [(2, 1), (4, 2), (5, 2), (6, 3), (3, 4)])
def test_a_silo_refuses_a_roster_where_t_is_not_a_majority(n, threshold):
    sessions = [
        ClientSession(silo=f"silo-{i}", session="s", round=1, threshold=threshold) for i in range(n)
    ]
    keys = {s.silo: s.advertise() for s in sessions}
    with pytest.raises(ProtocolError, match="more than half|needed"):
        sessions[0].set_peers(keys)


def test_a_silo_refuses_a_threshold_below_one():
    with pytest.raises(ProtocolError, match=">= 1"):
        ClientSession(silo="a", session="s", round=1, threshold=0)


def test_a_reveal_request_for_both_secrets_of_one_peer_is_refused():
    sessions = exchanged(5, 3)
    names = sorted(sessions)
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        sessions["silo-1"].reveal(survivors=names, dropped=["silo-0"])


def test_a_second_reveal_request_is_refused_even_after_a_refused_first():
    sessions = exchanged(5, 3)
    names = sorted(sessions)
    others = [n for n in names if n != "silo-0"]
    # answered first, then asked the other way round
    sessions["silo-1"].reveal(survivors=names, dropped=[])
    with pytest.raises(ProtocolError, match="already answered"):
        sessions["silo-1"].reveal(survivors=others, dropped=["silo-0"])
    # refused first (overlap), then asked again
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        sessions["silo-2"].reveal(survivors=names, dropped=["silo-0"])
    with pytest.raises(ProtocolError, match="already answered"):
        sessions["silo-2"].reveal(survivors=names, dropped=[])


def test_a_silo_shares_its_secrets_once():
    sessions = exchanged(3, 2)
    with pytest.raises(ProtocolError, match="already shared"):
        sessions["silo-0"].share()


def test_the_server_session_refuses_a_minority_threshold():
    with pytest.raises(ConfigError, match="more than half"):
        ServerSession(
            session="s",
            round=1,
            tasks={f"silo-{i}": f"t{i}" for i in range(4)},
            threshold=2,
            deadline=0.0,
            alive=lambda s: True,
        )


# ---- coordinator configuration --------------------------------------------------------------


def coordinator(
    *, secagg: SecAggConfig, allowed: frozenset[str] | None = None, **rounds: int
) -> CoordinatorConfig:
    return CoordinatorConfig(
        model=ModelSource(factory="m:f"),
        state_dir=pathlib.Path("state"),
        rounds=RoundConfig(**rounds),
        allowed_silos=allowed,
        secure_aggregation=secagg,
    )


@pytest.mark.parametrize(
    ("threshold", "rounds", "allowed"),
    [
        (1, {"min_clients": 2, "max_clients": 2}, None),  # one share would reveal a secret
        (2, {"min_clients": 4, "max_clients": 4}, None),  # exactly half
        (3, {"min_clients": 4, "max_clients": 6}, None),  # half of the largest round
        (3, {"min_clients": 5}, None),  # unbounded rounds: some would be too large
        (3, {"min_clients": 5}, frozenset(f"s{i}" for i in range(6))),  # 6 allowed silos
    ],
)
def test_a_threshold_that_can_be_at_most_half_a_round_is_a_config_error(threshold, rounds, allowed):
    with pytest.raises(ConfigError, match="secagg.threshold"):
        coordinator(secagg=SecAggConfig(threshold=threshold), allowed=allowed, **rounds)


@pytest.mark.parametrize(
    ("threshold", "rounds", "allowed"),
    [
        (0, {"min_clients": 2}, None),  # a majority of each round, whatever its size
        (3, {"min_clients": 5, "max_clients": 5}, None),
        (3, {"min_clients": 3, "max_clients": 5}, None),
        (3, {"min_clients": 5}, frozenset(f"s{i}" for i in range(5))),
    ],
)
def test_a_majority_threshold_is_accepted(threshold, rounds, allowed):
    config = coordinator(secagg=SecAggConfig(threshold=threshold), allowed=allowed, **rounds)
    assert config.secure_aggregation is not None


@pytest.mark.parametrize("clients", range(1, 40))
def test_the_default_threshold_is_a_majority_of_every_round(clients):
    assert 2 * SecAggConfig().threshold_for(clients) > clients


def test_threshold_for_refuses_a_round_the_configured_threshold_does_not_fit():
    with pytest.raises(ConfigError, match="more than half"):
        SecAggConfig(threshold=3).threshold_for(6)


def test_the_toml_threshold_and_colluders_keys_are_read_and_checked(tmp_path):
    def load(secagg: dict[str, int]) -> CoordinatorConfig:
        return CoordinatorConfig.from_dict(
            {
                "secure_aggregation": True,
                "secagg": secagg,
                "rounds": {"min_clients": 5, "max_clients": 5},
                "model": {"factory": "m:f"},
            },
            base_dir=tmp_path,
        )

    settings = load({"threshold": 3, "tolerate_colluders": 2}).secure_aggregation
    assert settings is not None and settings.tolerate_colluders == 2
    with pytest.raises(ConfigError, match="secagg.threshold = 2"):
        load({"threshold": 2})
    with pytest.raises(ConfigError, match="secagg.tolerate_colluders = 3"):
        load({"threshold": 3, "tolerate_colluders": 3})
