"""The coordinator's relayed lists as mappings by silo, refusing a silo named twice."""

from __future__ import annotations

from collections.abc import Iterable

from fedpriv.errors import SecAggError

__all__ = ["collect_contributions", "collect_peers", "collect_shares"]


def collect_peers(entries: Iterable[tuple[str, bytes, bytes]]) -> dict[str, tuple[bytes, bytes]]:
    """The coordinator's key list as a mapping, refusing a silo named twice.

    Raises:
        SecAggError: A silo appears more than once.
    """
    peers: dict[str, tuple[bytes, bytes]] = {}
    for name, cipher, mask in entries:
        if name in peers:
            raise SecAggError(f"the coordinator's key list names silo {name!r} twice")
        peers[name] = (cipher, mask)
    return peers


def _by_silo(entries: Iterable[tuple[str, bytes]], what: str) -> dict[str, bytes]:
    """`entries` as a mapping by silo, refusing a silo named twice in `what`."""
    values: dict[str, bytes] = {}
    for name, value in entries:
        if name in values:
            raise SecAggError(f"the coordinator's {what} names silo {name!r} twice")
        values[name] = value
    return values


def collect_contributions(entries: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    """The coordinator's list of opened graph contributions, refusing a silo named twice.

    Raises:
        SecAggError: A silo appears more than once.
    """
    return _by_silo(entries, "list of graph contributions")


def collect_shares(entries: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    """The relayed share ciphertexts by sender, refusing a sender named twice.

    Raises:
        SecAggError: A sender appears more than once.
    """
    return _by_silo(entries, "relayed shares")
