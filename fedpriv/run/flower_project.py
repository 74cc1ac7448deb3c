"""``fedpriv run PROJECT_DIR``: a Flower project (``flwr new`` layout) as a local federation.

It reads the project's pyproject.toml as ``flwr run`` does (``[tool.flwr.app]``:
``components.serverapp``, ``components.clientapp`` and ``config``), asks the
ServerApp for its strategy, rounds and initial model
(:func:`fedpriv.run.flower_server.plan_server_app`), issues a throwaway
federation CA with one certificate per silo, and runs the coordinator and the
silos in this process over mutually authenticated TLS on loopback. Silo ``i``
of ``N`` gets ``node_config = {"partition-id": i, "num-partitions": N}``, as
Flower's simulation gives its nodes. Nothing in the project is edited.

The state directory (the coordinator's SQLite store, every round's checkpoint,
the PKI) is kept, so ``fedpriv status`` and ``fedpriv report`` work on it.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import pathlib
import sys
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.serverapp.strategy import Strategy as MessageStrategy
from flwr.supercore.utils import get_flwr_home

from fedpriv._config import load_factory
from fedpriv._types import Scalar
from fedpriv.client import run_client
from fedpriv.client.flower_app import load_flower_app
from fedpriv.coordinator import (
    Coordinator,
    CoordinatorConfig,
    ModelSource,
    RoundConfig,
    RoundReporter,
    write_checkpoint,
)
from fedpriv.coordinator.settings import TLSFiles
from fedpriv.errors import ConfigError
from fedpriv.pki import CertificateAuthority, Role
from fedpriv.run.flower_server import ServerPlan, plan_server_app
from fedpriv.strategy.flower import FlowerStrategy
from fedpriv.strategy.flower_message import FlowerMessageStrategy
from fedpriv.transport import TLSConfig
from fedpriv.wire import Model

__all__ = ["FlowerProject", "fresh_run_dir", "parse_run_config", "run_flower_project"]

logger = logging.getLogger(__name__)

DEFAULT_SILOS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowerProject:
    """A Flower app's pyproject.toml, as far as fedpriv runs it.

    Args:
        root: The project directory.
        serverapp: ``module:attribute`` of the ServerApp.
        clientapp: ``module:attribute`` of the ClientApp.
        silos: Local silos to run: the default federation's ``num-supernodes`` where
            the pyproject still has ``[tool.flwr.federations]``; else that of the
            default connection in Flower's own config (``$FLWR_HOME/config.toml``,
            where ``flwr run`` moves the federations), when it is a local
            simulation; else 2.
    """

    root: pathlib.Path
    serverapp: str
    clientapp: str
    silos: int = DEFAULT_SILOS

    @classmethod
    def read(cls, root: pathlib.Path) -> FlowerProject:
        """Read `root`/pyproject.toml.

        Raises:
            ConfigError: No pyproject.toml, or no ``[tool.flwr.app.components]``.
        """
        path = root / "pyproject.toml"
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except OSError as err:
            raise ConfigError(f"{root}: no Flower project here ({err.strerror})") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
        flwr = data.get("tool", {}).get("flwr", {})
        components = flwr.get("app", {}).get("components", {})
        missing = [k for k in ("serverapp", "clientapp") if not isinstance(components.get(k), str)]
        if missing:
            raise ConfigError(
                f"{path}: [tool.flwr.app.components] needs {' and '.join(missing)} "
                "('package.module:app')"
            )
        federations = flwr.get("federations", {})
        default = federations.get(federations.get("default", ""), {})
        silos = default.get("options", {}).get("num-supernodes")
        if silos is None and not federations:
            silos = _flower_config_supernodes()
        return cls(
            root=root.resolve(),
            serverapp=components["serverapp"],
            clientapp=components["clientapp"],
            silos=int(silos if silos is not None else DEFAULT_SILOS),
        )


def _flower_config_supernodes() -> int | None:
    """``options.num-supernodes`` of the default connection in Flower's config, if local.

    flwr 1.2x and later keep SuperLink connections in ``$FLWR_HOME/config.toml``
    (``~/.flwr`` by default) and move a project's ``[tool.flwr.federations]`` there on
    its first ``flwr run``. A connection whose address is ``:local:`` is the local
    simulation ``flwr run .`` would start.
    """
    path = get_flwr_home() / "config.toml"
    try:
        with path.open("rb") as file:
            superlink = tomllib.load(file).get("superlink", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    connection = superlink.get(superlink.get("default", ""), {})
    if not isinstance(connection, dict) or connection.get("address") != ":local:":
        return None
    supernodes = connection.get("options", {}).get("num-supernodes")
    return supernodes if isinstance(supernodes, int) else None


def parse_run_config(text: str | None) -> dict[str, Scalar]:
    """``--run-config "k=v k2=v2"`` as ``flwr run`` parses it (TOML values).

    Raises:
        ConfigError: It does not parse.
    """
    try:
        parsed = parse_config_args([text] if text else None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--run-config {text!r}: {err}") from err
    wrong = sorted(k for k, v in parsed.items() if not isinstance(v, bool | int | float | str))
    if wrong:
        raise ConfigError(f"--run-config: {', '.join(wrong)} must be plain scalars")
    return dict(parsed)


def fresh_run_dir(runs: pathlib.Path, now: datetime.datetime) -> pathlib.Path:
    """A new, empty folder under `runs` named after `now` (UTC, to the second).

    Two runs started in the same second get ``STAMP``, then ``STAMP-2``, ``STAMP-3``:
    the folder is created here, exclusively, so no run reuses another's state or PKI.
    """
    runs.mkdir(parents=True, exist_ok=True)
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in itertools.count(1):
        candidate = runs / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def _pki(directory: pathlib.Path, silos: list[str]) -> tuple[TLSFiles, dict[str, TLSConfig]]:
    """A throwaway federation CA, the coordinator's certificate and one per silo."""
    ca = CertificateAuthority.create(directory, federation="flower-run")
    ca.issue("coordinator", role=Role.SERVER, out_dir=directory, hosts=["127.0.0.1", "localhost"])
    for silo in silos:
        ca.issue(silo, role=Role.CLIENT, out_dir=directory)
    server = TLSFiles(
        ca=directory / "ca.crt",
        cert=directory / "coordinator.crt",
        key=directory / "coordinator.key",
    )
    clients = {
        silo: TLSConfig.from_files(
            ca=directory / "ca.crt", cert=directory / f"{silo}.crt", key=directory / f"{silo}.key"
        )
        for silo in silos
    }
    return server, clients


def _strategy(plan: ServerPlan, model: Model) -> FlowerStrategy | FlowerMessageStrategy:
    if isinstance(plan.strategy, MessageStrategy):
        return FlowerMessageStrategy(plan.strategy, model=model, train_config=plan.train_config)
    return FlowerStrategy(plan.strategy)


def run_flower_project(
    project: FlowerProject,
    *,
    state_dir: pathlib.Path,
    silos: int | None = None,
    run_config: Mapping[str, Scalar] | None = None,
    reporter: RoundReporter | None = None,
    timeout_s: float | None = None,
) -> pathlib.Path:
    """Run `project` as a local federation; the final checkpoint's path.

    Raises:
        ConfigError: The project, its apps or `run_config` cannot be run (the message
            names the part).
        RoundFailed: A round failed for good.
    """
    count = project.silos if silos is None else silos
    if count < 1:
        raise ConfigError(f"--silos {count}: at least one silo is needed")
    if str(project.root) not in sys.path:
        sys.path.insert(0, str(project.root))
    try:
        fused = dict(get_fused_config_from_dir(project.root, dict(run_config or {})))
    except ValueError as err:
        raise ConfigError(f"--run-config: {err}") from err
    server_app = load_factory(project.serverapp, field="[tool.flwr.app.components] serverapp")
    plan = plan_server_app(
        server_app,
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=fused),
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    names = [f"silo-{i}" for i in range(count)]
    server_tls, client_tls = _pki(state_dir / "pki", names)
    model = Model.from_arrays(dict(plan.initial))
    initial = state_dir / "initial.fpck"
    write_checkpoint(initial, model)
    config = CoordinatorConfig(
        address="127.0.0.1:0",
        tls=server_tls,
        allowed_silos=frozenset(names),
        rounds=RoundConfig(num_rounds=plan.num_rounds, min_clients=count, min_results=count),
        model=ModelSource(checkpoint=initial),
        state_dir=state_dir / "coordinator",
    )
    clients = [
        load_flower_app(
            project.clientapp,
            node_config={"partition-id": i, "num-partitions": count},
            run_config=dict(run_config or {}),
        )
        for i in range(count)
    ]
    logger.info(
        "running %s: %d rounds of %s with %d local silos; state in %s",
        project.root.name,
        plan.num_rounds,
        type(plan.strategy).__name__,
        count,
        state_dir,
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    with Coordinator(config, strategy=_strategy(plan, model), reporter=reporter) as coordinator:
        threads = []
        for name, client in zip(names, clients, strict=True):

            def silo(client: Any = client, name: str = name) -> None:
                try:
                    run_client(
                        client,
                        coordinator=f"127.0.0.1:{coordinator.port}",
                        tls=client_tls[name],
                        stop=stop,
                    )
                except Exception as err:  # reported below, after the federation ends
                    errors.append(err)

            thread = threading.Thread(target=silo, name=name, daemon=True)
            thread.start()
            threads.append(thread)
        try:
            finished = coordinator.wait(timeout_s=timeout_s)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        committed = coordinator.store.last_committed()
    if errors:
        raise errors[0]
    if not finished:
        raise ConfigError(f"the federation did not finish within {timeout_s} s")
    if committed is None:  # pragma: no cover - the initial model is always committed
        raise RuntimeError("no committed round")
    with contextlib.suppress(ValueError):
        return committed.checkpoint.relative_to(pathlib.Path.cwd())
    return committed.checkpoint
