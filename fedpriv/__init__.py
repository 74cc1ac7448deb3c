"""fedpriv: privacy-preserving federated learning with mTLS gRPC and streaming aggregation.

User-facing names live here; everything else is in its subpackage.
"""

from __future__ import annotations

from fedpriv.client import Client, EvaluateResult, FitResult, run_client
from fedpriv.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    FedprivError,
    IntegrityError,
    PermissionDenied,
    PKIError,
    PrivacyBudgetExceeded,
    PrivacyWarning,
    ProtocolError,
    RoundFailed,
    SecAggError,
    StoreError,
    TransportError,
    UpdateRejected,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Client",
    "ConfigError",
    "ConnectError",
    "EvaluateResult",
    "FedprivError",
    "FitResult",
    "IntegrityError",
    "PKIError",
    "PermissionDenied",
    "PrivacyBudgetExceeded",
    "PrivacyWarning",
    "ProtocolError",
    "RoundFailed",
    "SecAggError",
    "StoreError",
    "TransportError",
    "UpdateRejected",
    "__version__",
    "run_client",
]
