"""The ``[tracking]`` table: which experiment trackers the coordinator logs the federation to.

Each sink is optional and needs its package, installed with the ``tracking`` extra
(``pip install 'fedpriv[tracking]'``). A sink that is configured while its package
is missing is a :class:`~fedpriv.errors.ConfigError` when the configuration is
read, so that an operator learns it at start-up and not from a silent gap in the
tracker. The packages themselves are imported only when the coordinator opens the
sink (``fedpriv.coordinator.tracking.mlflow_sink`` and ``tensorboard_sink``).
"""

from __future__ import annotations

import importlib.util
import pathlib
import urllib.parse
from dataclasses import dataclass

from fedpriv._config import Table
from fedpriv.errors import ConfigError

__all__ = ["EXTRA", "MlflowSettings", "TensorBoardSettings", "TrackingConfig", "require_package"]

# The optional dependency group (pyproject.toml) that installs every sink's package.
EXTRA = "tracking"


def require_package(package: str, *, field: str) -> None:
    """Raise unless `package` can be imported (it is looked up, not imported).

    Raises:
        ConfigError: `package` is not installed (or its import is blocked); the
            message names the extra that installs it.
    """
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"[{field}] needs the {package!r} package, which is not installed; "
            f"install it with: pip install 'fedpriv[{EXTRA}]' (or remove [{field}])"
        )


def _resolve_file_uri(uri: str, base_dir: pathlib.Path) -> str:
    """``file:`` URIs with a relative path are relative to the config file's folder."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc:
        return uri
    path = pathlib.Path(urllib.parse.unquote(parsed.path)).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve().as_uri()


@dataclass(frozen=True, slots=True, kw_only=True)
class MlflowSettings:
    """The ``[tracking.mlflow]`` table: log the federation as one MLflow run.

    Args:
        tracking_uri: Where MLflow stores runs: ``http(s)://host:port`` of a tracking
            server, ``databricks``, or ``file:./mlruns`` (a relative ``file:`` path is
            relative to the config file; MLflow 3 refuses its file store unless
            ``MLFLOW_ALLOW_FILE_STORE=true`` is set). Never logged, since it may hold
            credentials.
        experiment: The MLflow experiment (created if missing); None: the
            federation's name.
        run_name: The run's display name; None: MLflow picks one.
    """

    tracking_uri: str
    experiment: str | None = None
    run_name: str | None = None

    def __post_init__(self) -> None:
        if not self.tracking_uri.strip():
            raise ConfigError("tracking.mlflow.tracking_uri is empty: give the tracking server")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError(
                "tracking.mlflow.experiment is empty: omit it for the federation name"
            )
        require_package("mlflow", field="tracking.mlflow")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorBoardSettings:
    """The ``[tracking.tensorboard]`` table: write TensorBoard event files.

    Args:
        log_dir: The folder event files are written to (created if missing;
            relative to the config file). A restarted coordinator adds a new event
            file beside the old ones, which TensorBoard reads as one run.
    """

    log_dir: pathlib.Path

    def __post_init__(self) -> None:
        require_package("tensorboard", field="tracking.tensorboard")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackingConfig:
    """The ``[tracking]`` table: the experiment trackers to log to (none by default).

    Args:
        mlflow: The ``[tracking.mlflow]`` sink; None: off.
        tensorboard: The ``[tracking.tensorboard]`` sink; None: off.
    """

    mlflow: MlflowSettings | None = None
    tensorboard: TensorBoardSettings | None = None

    @property
    def enabled(self) -> bool:
        """Whether any sink is configured."""
        return self.mlflow is not None or self.tensorboard is not None

    @classmethod
    def from_table(cls, table: Table, *, base_dir: pathlib.Path) -> TrackingConfig:
        """Read the ``[tracking]`` table; a sub-table that is present turns its sink on.

        Raises:
            ConfigError: A key is unknown, missing or of the wrong type, or a
                configured sink's package is not installed.
        """
        mlflow_table = table.table("mlflow")
        tensorboard_table = table.table("tensorboard")
        mlflow = None
        if mlflow_table:
            mlflow = MlflowSettings(
                tracking_uri=_resolve_file_uri(mlflow_table.require("tracking_uri", str), base_dir),
                # Both default to None (the dataclass fields'): absent keys read as None.
                experiment=mlflow_table.optional("experiment", str),
                run_name=mlflow_table.optional("run_name", str),
            )
        tensorboard = None
        if tensorboard_table:
            log_dir = tensorboard_table.path("log_dir")
            if log_dir is None:
                raise ConfigError("tracking.tensorboard.log_dir is required")
            tensorboard = TensorBoardSettings(log_dir=log_dir)
        for sub in (mlflow_table, tensorboard_table):
            sub.finish()
        return cls(mlflow=mlflow, tensorboard=tensorboard)
