from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedpriv.client import EvaluateResult, FitResult
from fedpriv.pki import CertificateAuthority, Role
from fedpriv.transport import TLSConfig


@pytest.fixture(autouse=True)
def _flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's config home (FLWR_HOME) is the test's own: none of the user's leaks in."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


SILOS = ("silo-a", "silo-b", "silo-c", "silo-d", "silo-e")


@dataclass(frozen=True)
class Pki:
    root: pathlib.Path
    foreign: pathlib.Path

    def tls(self, name: str, *, foreign: bool = False) -> TLSConfig:
        base = self.foreign if foreign else self.root
        if foreign:
            # Built as is, past from_files' own checks (which refuse a certificate of
            # another CA before connecting): the coordinator must refuse it too.
            return TLSConfig(
                ca_pem=(self.root / "ca.crt").read_bytes(),
                cert_pem=(base / f"{name}.crt").read_bytes(),
                key_pem=(base / f"{name}.key").read_bytes(),
            )
        return TLSConfig.from_files(
            ca=self.root / "ca.crt", cert=base / f"{name}.crt", key=base / f"{name}.key"
        )

    def server_tls(self) -> TLSConfig:
        return self.tls("coordinator")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root, federation="testfed")
    ca.issue("coordinator", role=Role.SERVER, out_dir=root, hosts=["127.0.0.1", "localhost"])
    for name in (*SILOS, "intruder", "operator"):
        ca.issue(name, role=Role.CLIENT, out_dir=root)
    foreign_dir = tmp_path_factory.mktemp("foreign-pki")
    foreign = CertificateAuthority.create(foreign_dir, federation="otherfed")
    foreign.issue("silo-a", role=Role.CLIENT, out_dir=foreign_dir)
    return Pki(root=root, foreign=foreign_dir)


class ArrayClient:
    """A silo whose 'training' adds a fixed delta; no torch needed."""

    def __init__(self, delta: float = 1.0, num_examples: int = 10, data: np.ndarray | None = None):
        self.delta = delta
        self.num_examples = num_examples
        self.data = data
        self.fits = 0

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        self.fits += 1
        return FitResult(
            parameters={k: (v + self.delta).astype(v.dtype) for k, v in parameters.items()},
            num_examples=self.num_examples,
            metrics={"train_loss": float(self.delta)},
        )

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        mean = float(np.mean([float(v.mean()) for v in parameters.values()]))
        return EvaluateResult(
            num_examples=self.num_examples, metrics={"loss": mean, "accuracy": 0.5}
        )


@pytest.fixture
def array_client() -> type[ArrayClient]:
    return ArrayClient
