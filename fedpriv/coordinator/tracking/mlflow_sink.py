"""The MLflow sink: the federation as one MLflow run, continued across coordinator restarts.

Imported only when ``[tracking.mlflow]`` is configured (it imports ``mlflow``).
Everything that talks to the tracking server runs in the tracking thread
(:class:`~fedpriv.coordinator.tracking.reporter.Tracking`), never in the round loop.

The run's id is kept in the coordinator's state folder (``mlflow_run.json``), so
that a restarted coordinator continues the same run instead of starting one in
the middle of the federation; a new state folder is a new federation and gets a
new run, even under the same federation name.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Mapping

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedpriv.coordinator.tracking.records import RunStatus
from fedpriv.coordinator.tracking.settings import MlflowSettings
from fedpriv.storage import write_atomic

__all__ = ["RUN_FILE", "MlflowSink"]

logger = logging.getLogger(__name__)

# In the coordinator's state folder: {"run_id": "..."} of the run this federation logs to.
RUN_FILE = "mlflow_run.json"
# MLflow's limits for one log_batch call (mlflow.utils.validation).
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_FAILURE_TAG_CHARS = 5000


class MlflowSink:
    """Logs to one MLflow run (a :class:`~fedpriv.coordinator.tracking.records.TrackingSink`).

    Args:
        settings: The ``[tracking.mlflow]`` table.
        experiment: The experiment's name (the settings' or the federation's).
        federation: The federation's name, set as the run's ``fedpriv.federation`` tag.
        state_dir: The coordinator's state folder, where the run's id is kept.
    """

    name = "mlflow"

    def __init__(
        self,
        settings: MlflowSettings,
        *,
        experiment: str,
        federation: str,
        state_dir: pathlib.Path,
    ) -> None:
        self._settings = settings
        self._experiment = experiment
        self._federation = federation
        self._run_file = state_dir / RUN_FILE
        self._client: MlflowClient | None = None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        """The run logged to, once started."""
        return self._run_id

    def _stored_run_id(self) -> str | None:
        if not self._run_file.exists():
            return None
        run_id = json.loads(self._run_file.read_text()).get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    def _continue(self, client: MlflowClient, run_id: str) -> dict[str, str] | None:
        """The stored run's parameters if it can be continued; None: start a new run."""
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning(
                "mlflow: run %s of this state folder is not at the tracking server; "
                "starting a new run",
                run_id,
            )
            return None
        if run.info.lifecycle_stage != "active":
            logger.warning("mlflow: run %s was deleted; starting a new run", run_id)
            return None
        return dict(run.data.params)

    def _create(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(self._experiment)
        experiment_id = (
            client.create_experiment(self._experiment)
            if experiment is None
            else experiment.experiment_id
        )
        run = client.create_run(
            experiment_id,
            run_name=self._settings.run_name,
            tags={"fedpriv.federation": self._federation},
        )
        run_id: str = run.info.run_id
        write_atomic(self._run_file, json.dumps({"run_id": run_id}).encode())
        return run_id

    def start(self, params: Mapping[str, str]) -> None:
        """Continue this state folder's run, or create one, and log `params`.

        A continued run keeps the first value of every parameter (MLflow's
        parameters cannot change); one whose value changed is named in a warning.
        """
        client = MlflowClient(tracking_uri=self._settings.tracking_uri)
        run_id = self._stored_run_id()
        logged = None if run_id is None else self._continue(client, run_id)
        if run_id is None or logged is None:
            run_id = self._create(client)
            logged = {}
            logger.info("mlflow: started run %s in experiment %r", run_id, self._experiment)
        else:
            client.update_run(run_id, status="RUNNING")
            logger.info("mlflow: continuing run %s", run_id)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            logger.warning(
                "mlflow: run %s keeps the first value of the changed parameters %s",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for first in range(0, len(new), _PARAMS_PER_BATCH):
            batch = new[first : first + _PARAMS_PER_BATCH]
            client.log_batch(run_id, params=batch, synchronous=True)
        self._client, self._run_id = client, run_id

    def _started(self) -> tuple[MlflowClient, str]:
        if self._client is None or self._run_id is None:
            raise RuntimeError("the MLflow sink was not started")
        return self._client, self._run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Log `values` at `step`, in as few requests as MLflow allows."""
        client, run_id = self._started()
        timestamp_ms = int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp_ms, step) for k, v in values.items()]
        for first in range(0, len(metrics), _METRICS_PER_BATCH):
            batch = metrics[first : first + _METRICS_PER_BATCH]
            # Synchronous whatever MLFLOW_ENABLE_ASYNC_LOGGING says: a failure must
            # surface here, where the tracking thread turns it into one warning.
            client.log_batch(run_id, metrics=batch, synchronous=True)

    def end(self, status: RunStatus, *, detail: str) -> None:
        """End the run with `status`; a failure's reason becomes the ``fedpriv.failure`` tag."""
        client, run_id = self._started()
        if status is RunStatus.FAILED and detail:
            client.set_tag(run_id, "fedpriv.failure", detail[:_FAILURE_TAG_CHARS])
        client.set_terminated(run_id, status=status.value)

    def close(self) -> None:
        """Nothing to release: MLflow's client holds no open file or connection of ours."""
        self._client = None
