"""Adversarial peers: small-order keys, tampered shares and inconsistent rosters.

Every error stays in fedpriv's tree, an honest session leaves a bad peer out
instead of failing, and the coordinator stops waiting for a silo it refused.
"""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from fedpriv.errors import (
    FedprivError,
    InvalidPublicKey,
    InvalidShare,
    ProtocolError,
    RoundFailed,
    SecAggError,
)
from fedpriv.secagg import ClientSession, ServerSession, crypto
from fedpriv.secagg.client import collect_peers, collect_shares
from fedpriv.secagg.ring_sum import RingSum

P = 2**255 - 19
# The u-coordinates of the points of order 1, 2, 4 and 8 (libsodium's X25519 blocklist).
SMALL_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
]
# ... each canonical, with bit 255 set, and as u + p where that fits in 255 bits.
SMALL_ORDER_ENCODINGS = sorted(
    {
        (value | top).to_bytes(32, "little")
        for u in SMALL_ORDER_U
        for value in (u, u + P)
        if value < 2**255
        for top in (0, 1 << 255)
    }
)


def test_the_blocklist_has_fourteen_encodings_and_each_makes_agreement_all_zero():
    # Each really is of small order: OpenSSL refuses the all-zero secret it gives.
    assert len(SMALL_ORDER_ENCODINGS) == 14
    private = x25519.X25519PrivateKey.generate()
    for raw in SMALL_ORDER_ENCODINGS:
        with pytest.raises(ValueError):
            private.exchange(x25519.X25519PublicKey.from_public_bytes(raw))


@pytest.mark.parametrize(
    "raw", SMALL_ORDER_ENCODINGS, ids=lambda raw: raw.hex()[:8] + raw.hex()[-2:]
)
def test_every_small_order_encoding_is_refused(raw):
    with pytest.raises(InvalidPublicKey, match="small order"):
        crypto.check_public_key(raw)


@pytest.mark.parametrize("raw", [b"", bytes(31), bytes([9]) * 33, "x" * 32, bytearray(32)])
def test_a_key_of_the_wrong_length_or_type_is_refused(raw):
    with pytest.raises(InvalidPublicKey, match="32 bytes"):
        crypto.check_public_key(raw)


def test_a_fresh_public_key_and_a_high_bit_variant_of_it_pass():
    raw = crypto.KeyPair().public_bytes
    assert crypto.check_public_key(raw) == raw
    variant = bytes([*raw[:31], raw[31] | 0x80])
    assert crypto.check_public_key(variant) == variant


@pytest.mark.parametrize("raw", [bytes(32), bytes(31), (P + 1).to_bytes(32, "little")])
def test_key_agreement_with_a_bad_key_raises_in_fedprivs_tree(raw):
    mine = crypto.KeyPair()
    with pytest.raises(InvalidPublicKey):
        crypto.share_key(mine, raw, session="s", round=1, sender="a", receiver="b")
    with pytest.raises(InvalidPublicKey):
        crypto.pairwise_mask_seed(mine, raw, session="s", round=1, silos=("a", "b"))


@pytest.mark.parametrize("key", [bytes(32), bytes(5)])
def test_decrypting_garbage_or_with_a_malformed_key_raises_invalid_share(key):
    with pytest.raises(InvalidShare):
        crypto.decrypt(key, bytes(60), associated=b"ad")
    with pytest.raises(InvalidShare):
        crypto.decrypt(key, b"short", associated=b"ad")


def test_a_malformed_recovered_private_key_raises_invalid_share():
    with pytest.raises(InvalidShare):
        crypto.KeyPair.from_private_bytes(bytes(7))


def test_the_new_errors_sit_under_protocol_error_and_invalid_key_maps_to_invalid_argument():
    assert issubclass(SecAggError, ProtocolError) and issubclass(ProtocolError, FedprivError)
    assert issubclass(InvalidPublicKey, SecAggError) and issubclass(InvalidShare, SecAggError)
    assert InvalidPublicKey.grpc_status == "INVALID_ARGUMENT"


# ---- a silo's session ----------------------------------------------------------------------


def sessions(n: int, threshold: int) -> dict[str, ClientSession]:
    names = [f"silo-{i}" for i in range(n)]
    return {
        name: ClientSession(silo=name, session="s", round=1, threshold=threshold) for name in names
    }


def relay(group: dict[str, ClientSession], keys: dict[str, tuple[bytes, bytes]]) -> dict:
    """Set every session's peers to `keys`; return their outgoing shares."""
    for session in group.values():
        session.set_peers(keys)
    return {name: session.share() for name, session in group.items()}


@pytest.mark.parametrize("bad", [bytes(32), SMALL_ORDER_ENCODINGS[-1], bytes(31)])
def test_a_peer_with_a_bad_key_is_left_out_and_the_honest_silos_carry_on(bad):
    # Arrange: silo-4 is a peer that advertised a bad cipher key; four honest sessions
    group = sessions(4, threshold=3)
    keys = {name: s.advertise() for name, s in group.items()}
    keys["silo-4"] = (bad, crypto.KeyPair().public_bytes)
    # Act
    outgoing = relay(group, keys)
    for name, session in group.items():
        session.receive({s: out[name] for s, out in outgoing.items() if s != name})
    # Assert: nobody shared with silo-4, and each session says why it left it out
    for name, session in group.items():
        assert "silo-4" not in outgoing[name]
        assert list(session.excluded) == ["silo-4"]
        assert (
            "public key" in session.excluded["silo-4"] or "32 bytes" in session.excluded["silo-4"]
        )
        seeds, keys_revealed = session.reveal(survivors=sorted(group), dropped=[])
        assert sorted(n for n, _, _ in seeds) == sorted(group) and keys_revealed == []


def test_a_peer_reusing_one_key_for_shares_and_masks_is_left_out():
    group = sessions(3, threshold=2)
    keys = {name: s.advertise() for name, s in group.items()}
    same = crypto.KeyPair().public_bytes
    keys["silo-3"] = (same, same)
    group["silo-0"].set_peers(keys)
    assert list(group["silo-0"].excluded) == ["silo-3"]


def test_too_few_usable_peers_is_a_protocol_error_not_a_crash():
    group = sessions(2, threshold=2)
    keys = {name: s.advertise() for name, s in group.items()}
    keys["silo-1"] = (bytes(32), bytes(32))
    with pytest.raises(ProtocolError, match="usable keys"):
        group["silo-0"].set_peers(keys)


def exchanged(n: int, threshold: int, *, tamper: dict[str, set[str]] | None = None):
    """Sessions after the share step; `tamper[sender]` lists recipients whose share is flipped."""
    group = sessions(n, threshold)
    outgoing = relay(group, {name: s.advertise() for name, s in group.items()})
    for sender, victims in (tamper or {}).items():
        for victim in victims:
            sealed = bytearray(outgoing[sender][victim])
            sealed[20] ^= 0x40
            outgoing[sender][victim] = bytes(sealed)
    for name, session in group.items():
        session.receive({s: out[name] for s, out in outgoing.items() if s != name})
    return group


def test_a_tampered_share_is_reported_and_its_sender_gets_nothing_in_the_reveal():
    # Arrange
    group = exchanged(4, 3, tamper={"silo-3": {"silo-0"}})
    victim = group["silo-0"]
    # Assert: detected before anything is masked, and only for that sender
    assert victim.invalid_senders == ("silo-3",)
    assert all(group[n].invalid_senders == () for n in ("silo-1", "silo-2", "silo-3"))
    # ... the victim reveals nothing about silo-3, survivor or dropped
    seeds, _ = victim.reveal(survivors=sorted(group), dropped=[])
    assert sorted(n for n, _, _ in seeds) == ["silo-0", "silo-1", "silo-2"]
    other = exchanged(4, 3, tamper={"silo-3": {"silo-0"}})["silo-0"]
    seeds, keys = other.reveal(survivors=["silo-0", "silo-1", "silo-2"], dropped=["silo-3"])
    assert "silo-3" not in {n for n, _, _ in seeds} | {n for n, _, _ in keys}


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sealed: sealed[:-1],  # truncated
        lambda sealed: b"",  # empty
        lambda sealed: bytes(len(sealed)),  # zeros
        lambda sealed: sealed + b"x",  # extended
        lambda sealed: bytes([sealed[0] ^ 1]) + sealed[1:],  # nonce
    ],
    ids=["truncated", "empty", "zeros", "extended", "nonce"],
)
def test_any_corrupted_ciphertext_is_an_invalid_share(corrupt):
    group = sessions(3, threshold=2)
    outgoing = relay(group, {name: s.advertise() for name, s in group.items()})
    outgoing["silo-2"]["silo-0"] = corrupt(outgoing["silo-2"]["silo-0"])
    session = group["silo-0"]
    session.receive({s: out["silo-0"] for s, out in outgoing.items() if s != "silo-0"})
    assert session.invalid_senders == ("silo-2",)


def test_a_share_replayed_from_another_sender_is_an_invalid_share():
    group = sessions(3, threshold=2)
    outgoing = relay(group, {name: s.advertise() for name, s in group.items()})
    session = group["silo-0"]
    session.receive(
        {"silo-1": outgoing["silo-1"]["silo-0"], "silo-2": outgoing["silo-1"]["silo-0"]}
    )
    assert session.invalid_senders == ("silo-2",)


def test_the_coordinator_recovers_a_sum_when_one_share_was_tampered_with():
    # Arrange: a real server session over four client sessions; silo-3 tampers one share
    names = [f"silo-{i}" for i in range(4)]
    server = ServerSession(
        session="s",
        round=1,
        tasks={n: f"t-{n}" for n in names},
        threshold=3,
        deadline=time.monotonic() + 60,
        alive=lambda s: True,
    )
    group = {n: ClientSession(silo=n, session="s", round=1, threshold=3) for n in names}
    run_steps(server, group, tamper={"silo-3": {"silo-0"}})
    ring = RingSum(8, chunk_bytes=32)
    for name, session in group.items():
        masked = session.total_mask(8)
        masked += name_value(name)
        ring.fold(0, masked.view("<u4").tobytes(), weight=1.0)
    server.set_roster(names)
    for name, session in group.items():
        seeds, keys = session.reveal(survivors=names, dropped=[])
        server.unmask(name, f"t-{name}", self_mask=seeds, mask_key=keys)
    # Act
    server.unmask_sum(ring.total)
    # Assert
    assert ring.total.tolist() == [sum(name_value(n) for n in names)] * 8


def name_value(name: str) -> int:
    return 1000 + int(name.rsplit("-", 1)[1])


def run_steps(server, group, *, tamper):
    """Advertise and share through `server` with one thread per silo (the barriers block)."""
    peers: dict[str, dict] = {}
    received: dict[str, dict] = {}

    def silo(name: str, session: ClientSession) -> None:
        cipher, mask = session.advertise()
        peers[name] = server.advertise(name, f"t-{name}", cipher_key=cipher, mask_key=mask)
        session.set_peers(peers[name])
        out = session.share()
        for victim in tamper.get(name, ()):
            out[victim] = out[victim][:-1] + bytes([out[victim][-1] ^ 1])
        received[name] = server.share(name, f"t-{name}", out)
        session.receive(received[name])

    threads = [threading.Thread(target=silo, args=item) for item in group.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(received) == len(group)


def test_a_secret_left_with_fewer_than_t_shares_fails_the_round_and_names_the_reporters():
    names = [f"silo-{i}" for i in range(4)]
    server = ServerSession(
        session="s",
        round=1,
        tasks={n: f"t-{n}" for n in names},
        threshold=3,
        deadline=time.monotonic() + 60,
        alive=lambda s: True,
    )
    group = {n: ClientSession(silo=n, session="s", round=1, threshold=3) for n in names}
    run_steps(server, group, tamper={"silo-3": {"silo-0", "silo-1", "silo-2"}})
    server.set_roster(names)
    for name, session in group.items():
        seeds, keys = session.reveal(survivors=names, dropped=[])
        server.unmask(name, f"t-{name}", self_mask=seeds, mask_key=keys)
    with pytest.raises(RoundFailed, match="silo-3") as failed:
        server.unmask_sum(RingSum(8, chunk_bytes=32).total)
    assert "silo-0" in str(failed.value) and "no model is published" in str(failed.value)


# ---- inconsistent rosters -------------------------------------------------------------------


def test_a_key_list_naming_a_silo_twice_is_refused():
    with pytest.raises(SecAggError, match="twice"):
        collect_peers([("a", b"1", b"2"), ("b", b"3", b"4"), ("a", b"5", b"6")])
    with pytest.raises(SecAggError, match="twice"):
        collect_shares([("a", b"1"), ("a", b"2")])


def test_a_key_list_without_this_silo_or_with_its_keys_replaced_is_refused():
    group = sessions(3, threshold=2)
    keys = {name: s.advertise() for name, s in group.items()}
    without = {n: k for n, k in keys.items() if n != "silo-0"}
    with pytest.raises(SecAggError, match="own keys"):
        group["silo-0"].set_peers(without)
    replaced = dict(keys, **{"silo-0": (crypto.KeyPair().public_bytes, keys["silo-0"][1])})
    with pytest.raises(SecAggError, match="own keys"):
        group["silo-0"].set_peers(replaced)


def test_a_peer_whose_key_changed_between_steps_is_refused():
    group = sessions(3, threshold=2)
    keys = {name: s.advertise() for name, s in group.items()}
    session = group["silo-0"]
    session.set_peers(keys)
    changed = dict(keys, **{"silo-1": (crypto.KeyPair().public_bytes, keys["silo-1"][1])})
    with pytest.raises(SecAggError, match="changed"):
        session.set_peers(changed)


def test_shares_from_a_silo_outside_the_key_list_are_refused():
    group = sessions(3, threshold=2)
    outgoing = relay(group, {name: s.advertise() for name, s in group.items()})
    shares = {s: out["silo-0"] for s, out in outgoing.items() if s != "silo-0"}
    with pytest.raises(SecAggError, match="without usable keys"):
        group["silo-0"].receive({**shares, "silo-9": bytes(60)})
    with pytest.raises(SecAggError):
        group["silo-0"].receive({**shares, "silo-0": bytes(60)})


@pytest.mark.parametrize(
    ("survivors", "dropped", "match"),
    [
        (["silo-0", "silo-1", "silo-1"], [], "twice"),
        (["silo-0", "silo-1", "silo-2", "silo-9"], [], "outside"),  # the roster grew
        (["silo-1", "silo-2"], ["silo-0"], "leaves this one out"),
        (["silo-0", "silo-1", "silo-2"], ["silo-2"], "both"),
    ],
)
def test_an_inconsistent_reveal_roster_is_a_secagg_error(survivors, dropped, match):
    session = exchanged(3, 2)["silo-0"]
    with pytest.raises(SecAggError, match=match):
        session.reveal(survivors=survivors, dropped=dropped)


# ---- the coordinator's session --------------------------------------------------------------


def test_the_coordinator_refuses_a_small_order_key_and_stops_waiting_for_that_silo():
    # Arrange: three silos, t = 2; silo-a advertises the all-zero key first
    refused: list[tuple[str, str]] = []
    server = ServerSession(
        session="s",
        round=1,
        tasks={"silo-a": "ta", "silo-b": "tb", "silo-c": "tc"},
        threshold=2,
        deadline=float("inf"),  # the barrier must not need a deadline to move on
        alive=lambda s: True,
        on_refused=lambda silo, reason: refused.append((silo, reason)),
    )
    with pytest.raises(InvalidPublicKey):
        server.advertise("silo-a", "ta", cipher_key=bytes(32), mask_key=bytes([9]) * 32)
    # Act: the two honest silos advertise
    replies = {}

    def advertise(name: str, task: str) -> None:
        session = ClientSession(silo=name, session="s", round=1, threshold=2)
        cipher, mask = session.advertise()
        replies[name] = server.advertise(name, task, cipher_key=cipher, mask_key=mask)

    threads = [
        threading.Thread(target=advertise, args=a) for a in (("silo-b", "tb"), ("silo-c", "tc"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # Assert: they were not kept waiting for silo-a, which is out of the round for good
    assert sorted(replies) == ["silo-b", "silo-c"]
    assert all(sorted(peers) == ["silo-b", "silo-c"] for peers in replies.values())
    assert [silo for silo, _ in refused] == ["silo-a"] and "small order" in refused[0][1]
    with pytest.raises(ProtocolError):
        server.advertise("silo-a", "ta", cipher_key=bytes([7]) * 32, mask_key=bytes([9]) * 32)


def test_the_coordinator_refuses_misaddressed_shares_and_stops_waiting_for_that_silo():
    refused: list[str] = []
    server = ServerSession(
        session="s",
        round=1,
        tasks={"a": "ta", "b": "tb", "c": "tc"},
        threshold=2,
        deadline=float("inf"),
        alive=lambda s: True,
        on_refused=lambda silo, reason: refused.append(silo),
    )
    group = {n: ClientSession(silo=n, session="s", round=1, threshold=2) for n in "abc"}
    results: dict[str, object] = {}

    def silo(name: str) -> None:
        cipher, mask = group[name].advertise()
        group[name].set_peers(server.advertise(name, f"t{name}", cipher_key=cipher, mask_key=mask))
        out = group[name].share()
        if name == "a":
            out.pop("b")  # misaddressed: nothing for silo b
        try:
            results[name] = server.share(name, f"t{name}", out)
        except SecAggError as err:
            results[name] = err

    threads = [threading.Thread(target=silo, args=(n,)) for n in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert isinstance(results["a"], SecAggError) and refused == ["a"]
    assert sorted(results["b"]) == ["c"] and sorted(results["c"]) == ["b"]


def test_a_withdrawn_survivor_is_not_waited_for_at_the_reveal():
    server = ServerSession(
        session="s",
        round=1,
        tasks={"a": "ta", "b": "tb"},
        threshold=2,
        deadline=time.monotonic() + 60,
        alive=lambda s: True,
    )
    server.set_roster(["a", "b"])
    server.withdraw("a", "the roster grew")
    server.withdraw("b", "the roster grew")
    started = time.monotonic()
    assert server.wait_for_shares(until=started + 60) == 0
    assert time.monotonic() - started < 5


def test_the_coordinator_refuses_revealed_shares_at_another_silos_position():
    names = ["silo-0", "silo-1", "silo-2"]
    server = ServerSession(
        session="s",
        round=1,
        tasks={n: f"t-{n}" for n in names},
        threshold=2,
        deadline=time.monotonic() + 60,
        alive=lambda s: True,
    )
    group = {n: ClientSession(silo=n, session="s", round=1, threshold=2) for n in names}
    run_steps(server, group, tamper={})
    server.set_roster(names)
    seeds, keys = group["silo-0"].reveal(survivors=names, dropped=[])
    forged = [(owner, 2, y) for owner, _, y in seeds]  # silo-1's position
    with pytest.raises(ProtocolError, match="position 1"):
        server.unmask("silo-0", "t-silo-0", self_mask=forged, mask_key=keys)
