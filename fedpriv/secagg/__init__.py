"""Secure aggregation: the coordinator learns only the sum of the silos' updates."""

from __future__ import annotations

from fedpriv.secagg.client import ClientSession
from fedpriv.secagg.ring import RingCodec
from fedpriv.secagg.server import ServerSession

__all__ = ["ClientSession", "RingCodec", "ServerSession"]
