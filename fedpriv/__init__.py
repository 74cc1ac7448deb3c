"""fedpriv: privacy-preserving federated learning with mTLS gRPC and streaming aggregation.

The names a user needs live here (``from fedpriv import TorchClient, LocalDP``);
everything else is in its subpackage. The torch-based ones (``TorchClient``,
``LocalDP``, ``GradSampleMode``) are imported on first use, so that
``import fedpriv`` (and the coordinator) never imports torch.
"""

from __future__ import annotations

import os

# gRPC's C core logs each failed TLS handshake (and more) at INFO straight to stderr,
# in its own format. fedpriv turns those failures into errors that name the cause and
# the fix, so only the core's errors are shown unless the user chose a verbosity. It is
# read once, when grpc is first imported: hence here, before any import of grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from typing import TYPE_CHECKING

from fedpriv._lazy import lazy_exports
from fedpriv.client import (
    Client,
    ClientStats,
    EvaluateResult,
    FitResult,
    ReleasePolicy,
    TaskLimits,
    run_client,
)
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import Coordinator, CoordinatorConfig
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
from fedpriv.privacy.central import CentralDP
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from fedpriv.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    Median,
    TrimmedMean,
)
from fedpriv.transport import TLSConfig

if TYPE_CHECKING:
    from fedpriv.client.torch import TorchClient
    from fedpriv.privacy.local import GradSampleMode, LocalDP

__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "TorchClient": "fedpriv.client.torch",
        "GradSampleMode": "fedpriv.privacy.local",
        "LocalDP": "fedpriv.privacy.local",
    },
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CentralDP",
    "Client",
    "ClientConfig",
    "ClientStats",
    "ConfigError",
    "ConnectError",
    "Coordinator",
    "CoordinatorConfig",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "FedprivError",
    "FitResult",
    "GradSampleMode",
    "IntegrityError",
    "Krum",
    "LocalDP",
    "Median",
    "PKIError",
    "PermissionDenied",
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivacyWarning",
    "ProtocolError",
    "ReleasePolicy",
    "RoundFailed",
    "SecAggError",
    "StoreError",
    "TLSConfig",
    "TaskLimits",
    "TorchClient",
    "TransportError",
    "TrimmedMean",
    "UpdateRejected",
    "run_client",
    "__version__",
]
