"""A silo that attacks secure aggregation, run as its own process by the tests.

    python -m tests.adversary zero-key|tamper-all client --app ... --config ...

``zero-key`` advertises the all-zero (small-order) X25519 cipher key;
``tamper-all`` flips one bit of every share ciphertext it sends. Everything
else is the ordinary ``fedpriv`` command line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fedpriv.cli.main import main
from fedpriv.secagg import ClientSession


def _zero_key(session: ClientSession) -> tuple[bytes, bytes]:
    return bytes(32), session._mask.public_bytes  # test seam: the silo's own mask key


def _tamper_all(
    original: Callable[[ClientSession], dict[str, bytes]],
) -> Callable[[ClientSession], dict[str, bytes]]:
    def share(session: ClientSession) -> dict[str, bytes]:
        return {
            name: sealed[:-1] + bytes([sealed[-1] ^ 1])
            for name, sealed in original(session).items()
        }

    return share


if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "zero-key":
        ClientSession.advertise = _zero_key  # type: ignore[method-assign]  # the attack, this process only
    elif mode == "tamper-all":
        ClientSession.share = _tamper_all(ClientSession.share)  # type: ignore[method-assign]  # the attack, this process only
    else:
        raise SystemExit(f"unknown attack {mode!r}")
    sys.exit(main(argv))
