"""The coordinator attacks a real secure-aggregation round with a dropout (gRPC, mTLS).

The coordinator relays every encrypted share and receives every revealed share.
If the shares u→v and v→u were sealed under one (key, nonce), XOR of the two
ciphertexts would cancel the keystream; the parts of one plaintext that the
coordinator can compute would then give away the other plaintext's parts. This
test runs that attack against what a real round relays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpriv.client import FitResult, run_client
from fedpriv.coordinator import Coordinator, SecAggConfig
from fedpriv.errors import ProtocolError
from fedpriv.secagg import ClientSession, ServerSession, crypto, shamir
from tests.apps import RandomUpdateClient
from tests.conftest import SILOS
from tests.helpers import make_config, silo_thread, wait_silos

SHAPES = {"w": (40, 10), "b": (10,)}
DROPPED = "silo-c"
_PLAIN_HEAD = 2  # the big-endian x index in front of the two shares


class CrashingClient(RandomUpdateClient):
    """Takes part in the key exchange, then leaves the federation during training."""

    def __init__(self, index: int, stop: threading.Event) -> None:
        super().__init__(index)
        self.stop = stop

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        self.stop.set()
        raise ProtocolError("the silo went away during training")


def evaluate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """The polynomial through `points` (over Shamir's field) evaluated at `x`."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (x - xj) % shamir.PRIME
                denominator = denominator * (xi - xj) % shamir.PRIME
        value = (value + yi * numerator * pow(denominator, -1, shamir.PRIME)) % shamir.PRIME
    return value


def xor_attack(
    relayed: Mapping[str, Mapping[str, bytes]],
    revealed: Mapping[str, tuple[list[tuple[str, int, bytes]], list[tuple[str, int, bytes]]]],
    *,
    roster: Sequence[str],
    dropped: str,
    threshold: int,
    offset: int,
) -> bytes | None:
    """The dropped silo's self-mask seed, from XORed ciphertext pairs; None when it fails.

    `offset` is where the AES-GCM body starts in a relayed ciphertext (0 for a
    bare body, 12 behind a nonce).
    """
    x_of = {name: i + 1 for i, name in enumerate(sorted(roster))}
    seed_points: dict[str, list[tuple[int, int]]] = {}
    for seeds, _ in revealed.values():
        for owner, x, y in seeds:
            seed_points.setdefault(owner, []).append((x, int.from_bytes(y, "big")))
    recovered = []
    for survivor, points in seed_points.items():
        if survivor == dropped or len(points) < threshold:
            continue
        # The survivor's seed polynomial is known once t of its shares are revealed, so
        # its share at the dropped silo's x, inside the ciphertext survivor → dropped, is too.
        known = evaluate_at(points[:threshold], x_of[dropped]).to_bytes(shamir.SHARE_BYTES, "big")
        to_dropped = relayed[survivor][dropped]
        from_dropped = relayed[dropped][survivor]
        if len(to_dropped) != len(from_dropped):
            return None
        start = offset + _PLAIN_HEAD
        stream_xor = bytes(
            a ^ b
            for a, b in zip(
                to_dropped[start : start + shamir.SHARE_BYTES],
                from_dropped[start : start + shamir.SHARE_BYTES],
                strict=True,
            )
        )
        share = bytes(a ^ b for a, b in zip(stream_xor, known, strict=True))
        recovered.append((x_of[survivor], share))
    try:
        return shamir.combine(recovered, threshold=threshold)
    except ValueError:
        return None


def test_the_coordinator_cannot_recover_a_dropped_silos_seed_from_relayed_ciphertexts(
    tmp_path, pki, monkeypatch
):
    # Arrange: the coordinator's view (what it relays and what it is revealed) ...
    relayed: dict[str, dict[str, bytes]] = {}
    revealed: dict[str, tuple[list[Any], list[Any]]] = {}
    original_share, original_unmask = ServerSession.share, ServerSession.unmask

    def relay(self, silo, task_id, shares):
        relayed[silo] = dict(shares)
        return original_share(self, silo, task_id, shares)

    def unmask(self, silo, task_id, *, self_mask, mask_key):
        revealed[silo] = (list(self_mask), list(mask_key))
        return original_unmask(self, silo, task_id, self_mask=self_mask, mask_key=mask_key)

    monkeypatch.setattr(ServerSession, "share", relay)
    monkeypatch.setattr(ServerSession, "unmask", unmask)
    # ... every (key, nonce) pair AES-GCM seals under, in this process ...
    sealed: list[tuple[bytes, bytes]] = []

    real_aesgcm = crypto.AESGCM

    class RecordingAESGCM:
        """AESGCM that records the key and nonce of every encryption."""

        def __init__(self, key: bytes) -> None:
            self.key, self.inner = bytes(key), real_aesgcm(key)

        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            sealed.append((self.key, bytes(nonce)))
            return self.inner.encrypt(nonce, data, associated_data)

        def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            return self.inner.decrypt(nonce, data, associated_data)

    monkeypatch.setattr(crypto, "AESGCM", RecordingAESGCM)
    # ... and, to judge the attack, the secret it is after (a test-only peek)
    secrets_of: dict[str, bytes] = {}
    original_client_share = ClientSession.share

    def keep_seed(self):
        secrets_of[self.silo] = self._seed
        return original_client_share(self)

    monkeypatch.setattr(ClientSession, "share", keep_seed)
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        min_clients=5,
        max_clients=5,
        min_results=3,
        num_rounds=1,
        federated_evaluation=False,
    )
    config = dataclasses.replace(
        config, secure_aggregation=SecAggConfig(threshold=3, unmask_deadline_s=15)
    )
    # Act: five silos over mTLS; silo-c shares its keys, then leaves during training
    crash_stop = threading.Event()
    with Coordinator(config) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(
                silo_thread(RandomUpdateClient(i), port=coordinator.port, tls=pki.tls(name))
            )
            for i, name in enumerate(SILOS)
            if name != DROPPED
        ]
        crashed = threading.Thread(
            target=run_client,
            args=(CrashingClient(2, crash_stop),),
            kwargs={
                "coordinator": f"127.0.0.1:{coordinator.port}",
                "tls": pki.tls(DROPPED),
                "poll_wait_s": 2,
                "reconnect_timeout_s": 30,
                "stop": crash_stop,
            },
            daemon=True,
        )
        crashed.start()
        assert coordinator.wait(timeout_s=120)
        wait_silos(outcomes)
        crashed.join(30)
    # Assert: the round ran with a dropout, and the coordinator saw every share in transit
    survivors = sorted(set(SILOS) - {DROPPED})
    assert sorted(revealed) == survivors
    assert all(keys and keys[0][0] == DROPPED for _, keys in revealed.values())
    assert sorted(relayed) == sorted(SILOS)
    assert all(sorted(shares) == sorted(set(SILOS) - {s}) for s, shares in relayed.items())
    # ... no (key, nonce) pair sealed twice ...
    assert len(sealed) == len(SILOS) * (len(SILOS) - 1)
    assert len(set(sealed)) == len(sealed)
    assert len({key for key, _ in sealed}) == len(sealed)
    # ... and the XOR attack, at either alignment of the body, misses the dropped seed
    for offset in (0, 12):
        guess = xor_attack(
            relayed, revealed, roster=SILOS, dropped=DROPPED, threshold=3, offset=offset
        )
        assert guess != secrets_of[DROPPED]
