"""The client SDK: the Client protocol, the silo runtime loop and the PyTorch helper.

``fedpriv.client.torch`` imports torch; import it only where torch is wanted.
"""

from __future__ import annotations

from fedpriv.client.base import Client, EvaluateResult, FitResult
from fedpriv.client.messages import ClientStats
from fedpriv.client.release import ReleasePolicy
from fedpriv.client.runtime import Backoff, run_client
from fedpriv.client.tasks import TaskLimits

__all__ = [
    "Backoff",
    "Client",
    "ClientStats",
    "EvaluateResult",
    "FitResult",
    "ReleasePolicy",
    "TaskLimits",
    "run_client",
]
