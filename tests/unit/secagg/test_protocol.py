"""The secure-aggregation protocol end to end in one process (barriers in threads)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedpriv.errors import ProtocolError, RoundFailed
from fedpriv.secagg import ClientSession, RingCodec, ServerSession, shamir
from fedpriv.secagg.crypto import mask_elements

SIZE = 3000


def run_round(n, threshold, *, no_upload=(), no_reveal=()):
    """n silos; `no_upload` share keys but send nothing; `no_reveal` send but never reveal."""
    names = [f"silo-{i}" for i in range(n)]
    tasks = {name: f"task-{name}" for name in names}
    gone: set[str] = set()
    server = ServerSession(
        session="round-1",
        round=1,
        tasks=tasks,
        threshold=threshold,
        deadline=time.monotonic() + 20,
        alive=lambda s: s not in gone,
    )
    codec = RingCodec.plan(clip_norm=10.0, size=SIZE, clients=n, threshold=threshold)
    rng = np.random.default_rng(0)
    updates = {name: rng.normal(0, 0.05, SIZE) for name in names}
    total = np.zeros(SIZE, np.uint32)
    lock = threading.Lock()
    sessions = {
        name: ClientSession(silo=name, session="round-1", round=1, threshold=threshold)
        for name in names
    }
    uploaded = threading.Semaphore(0)

    def silo(name):
        session = sessions[name]
        cipher, mask = session.advertise()
        peers = server.advertise(name, tasks[name], cipher_key=cipher, mask_key=mask)
        session.set_peers(peers)
        received = server.share(name, tasks[name], session.share())
        session.receive(received)
        if name in no_upload:
            gone.add(name)
            uploaded.release()
            return
        ring, _ = codec.encode(updates[name], rng=np.random.default_rng(hash(name) % 2**32))
        session.mask(ring)
        with lock:
            total[...] += ring
        uploaded.release()
        if name in no_reveal:
            gone.add(name)
            return
        survivors, dropped = server.roster(name, tasks[name], until=time.monotonic() + 20)
        seeds, keys = session.reveal(survivors=survivors, dropped=dropped)
        server.unmask(name, tasks[name], self_mask=seeds, mask_key=keys)

    threads = [threading.Thread(target=silo, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for _ in range(n):
        assert uploaded.acquire(timeout=30)
    server.set_roster([n_ for n_ in names if n_ not in no_upload])
    for t in threads:
        t.join(30)
    server.wait_for_shares(until=time.monotonic() + 5)
    server.unmask_sum(total)
    expected = sum(updates[name] for name in names if name not in no_upload)
    return codec.decode(total), expected, codec


def test_unmasked_sum_equals_the_plain_sum_within_quantisation():
    got, expected, codec = run_round(5, 3)
    np.testing.assert_allclose(got, expected, atol=5 / codec.scale)


def test_silos_that_drop_before_or_after_sending_are_recovered():
    # t = 4 of 7: a majority, as the protocol requires (t = 3 of 6 is refused)
    got, expected, codec = run_round(7, 4, no_upload=("silo-1",), no_reveal=("silo-4", "silo-5"))
    np.testing.assert_allclose(got, expected, atol=5 / codec.scale)


def test_fewer_than_threshold_revealing_fails_the_round():
    with pytest.raises(RoundFailed, match="only 2 silos revealed shares, 3 needed"):
        run_round(5, 3, no_reveal=("silo-2", "silo-3", "silo-4"))


def test_shamir_needs_threshold_shares():
    secret = bytes(range(32))
    parts = shamir.split(secret, shares=5, threshold=3)
    assert shamir.combine([parts[4], parts[0], parts[2]], threshold=3) == secret
    with pytest.raises(ValueError, match="2 shares, 3 needed"):
        shamir.combine(parts[:2], threshold=3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([parts[0], parts[0], parts[2]], threshold=3)


def test_mask_chunks_agree_with_the_whole_mask():
    seed = bytes(range(32))
    whole = mask_elements(seed, first=0, count=1000)
    for first, count in ((0, 1), (1, 7), (3, 500), (999, 1)):
        np.testing.assert_array_equal(
            mask_elements(seed, first=first, count=count), whole[first : first + count]
        )


def test_a_silo_cannot_advertise_twice_or_for_another_task():
    server = ServerSession(
        session="s",
        round=1,
        tasks={"a": "t1"},
        threshold=1,
        deadline=time.monotonic() + 1,
        alive=lambda s: True,
    )
    with pytest.raises(ProtocolError, match="no secure-aggregation task"):
        server.advertise("a", "t2", cipher_key=bytes([9]) * 32, mask_key=bytes([1]) * 32)
    with pytest.raises(ProtocolError, match="32 bytes"):
        server.advertise("a", "t1", cipher_key=b"short", mask_key=bytes(32))


def test_reveal_refuses_overlapping_sets():
    session = ClientSession(silo="a", session="t", round=1, threshold=1)
    session.set_peers({"a": session.advertise()})
    session.share()
    session.receive({})
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        session.reveal(survivors=["a"], dropped=["a"])
