"""Run a Flower ``ClientApp`` as a fedpriv silo: Message API handlers and legacy ``client_fn``.

``fedpriv client --flower-app module:target`` takes what a Flower app's
``[tool.flwr.app.components] clientapp`` names:

- a ``ClientApp`` with ``@app.train()`` / ``@app.evaluate()`` handlers (the
  Message API). Each task becomes a ``Message`` whose content is what Flower's
  ``flwr.serverapp.strategy`` strategies send: ``"arrays"`` (an ``ArrayRecord``
  of the global model, keyed by parameter name) and ``"config"`` (a
  ``ConfigRecord`` with ``server-round``). The reply must hold one
  ``ArrayRecord`` (for ``train``) and one ``MetricRecord`` with
  ``num-examples``, as Flower's strategies require;
- a ``ClientApp(client_fn=...)``: called with the legacy ``FitIns`` /
  ``EvaluateIns`` records, so its mods run as under Flower;
- a ``client_fn(context)`` (see :mod:`fedpriv.client.flower`).

The ``Context`` is Flower's: ``node_config`` is the silo's ``[app]`` table and
``run_config`` is the app's ``[tool.flwr.app.config]`` (from the pyproject.toml
of the project that holds the module) with the silo's ``[run_config]`` table
over it, as ``flwr run --run-config`` overrides it. One context lives as long as
the silo, so ``context.state`` carries over between rounds.
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.config import get_fused_config_from_dir
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)

from fedpriv._config import load_factory
from fedpriv._types import Scalar
from fedpriv.client.base import Client, EvaluateResult, FitResult
from fedpriv.client.flower import flower_config, from_client_fn, scalars
from fedpriv.errors import ConfigError

__all__ = [
    "ClientAppAdapter",
    "find_project",
    "flower_client",
    "load_flower_app",
    "run_config_for",
]

# The keys Flower's serverapp strategies use (FedAvg's arrayrecord_key, configrecord_key,
# weighted_by_key defaults).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"


def find_project(module_file: str | None) -> pathlib.Path | None:
    """The nearest directory above `module_file` whose pyproject.toml has ``[tool.flwr.app]``."""
    if module_file is None:
        return None
    import tomllib

    for directory in pathlib.Path(module_file).resolve().parents:
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file():
            with pyproject.open("rb") as file:
                data = tomllib.load(file)
            if "app" in data.get("tool", {}).get("flwr", {}):
                return directory
    return None


def run_config_for(
    project: pathlib.Path | None, overrides: Mapping[str, Scalar]
) -> dict[str, Scalar]:
    """The app's ``[tool.flwr.app.config]`` with `overrides` over it, as Flower fuses them.

    Raises:
        ConfigError: The project's pyproject.toml is invalid for Flower, or an override
            names a key the app's config does not have.
    """
    if project is None:
        return dict(overrides)
    try:
        return dict(get_fused_config_from_dir(project, dict(overrides)))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"[run_config] for the Flower app in {project}: {err}") from err


def _array_record(parameters: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in parameters.items()})


def _one(records: Mapping[str, Any], kind: str, action: str) -> Any:
    """The one record of `kind` in a reply, as Flower's strategies require."""
    if len(records) != 1:
        raise ValueError(
            f"the ClientApp's {action} reply holds {len(records)} {kind}s "
            f"({', '.join(sorted(records)) or 'none'}); Flower's strategies need exactly one"
        )
    return next(iter(records.values()))


def _num_examples(metrics: Mapping[str, Any], action: str) -> int:
    value = metrics.get(NUM_EXAMPLES_KEY)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"the ClientApp's {action} reply has no valid {NUM_EXAMPLES_KEY!r} in its "
            f"MetricRecord (got {value!r}); Flower's strategies weight updates by it"
        )
    return int(value)


def _named(
    record: ArrayRecord, names: list[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, npt.NDArray[Any]]:
    """The reply's arrays by parameter name: by key if the keys are the names, else by position."""
    keys = list(record.keys())
    if sorted(keys) == sorted(names):
        arrays = {name: record[name].numpy() for name in names}
    elif len(keys) == len(names):
        arrays = dict(zip(names, (record[key].numpy() for key in keys), strict=True))
    else:
        raise ValueError(f"the ClientApp returned {len(keys)} arrays for a model of {len(names)}")
    wrong = [n for n in names if tuple(arrays[n].shape) != shapes[n]]
    if wrong:
        raise ValueError(f"the ClientApp returned arrays of other shapes for {', '.join(wrong)}")
    return arrays


class ClientAppAdapter:
    """A :class:`fedpriv.Client` backed by a Flower ``ClientApp``.

    Args:
        app: The ``ClientApp``.
        context: The Flower context it runs in (kept for the silo's lifetime).
    """

    def __init__(self, app: ClientApp, context: Context) -> None:
        self.app = app
        self.context = context
        # A ClientApp(client_fn=...) speaks the legacy records; one with handlers the Message API.
        self.legacy = app._call is not None  # noqa: SLF001  (flwr has no public flag for it)
        self._ids = itertools.count(1)

    def _message(self, content: RecordDict, kind: str, round: int) -> Message:
        metadata = Metadata(
            run_id=int(self.context.run_id),
            message_id=f"fedpriv-{next(self._ids)}",
            src_node_id=0,
            dst_node_id=int(self.context.node_id),
            reply_to_message_id="",
            group_id=str(round),
            created_at=time.time(),
            ttl=43200.0,
            message_type=kind,
        )
        # Flower builds instruction messages with metadata set (its Grid does); the public
        # overloads need a run's TaskIdentity, which only Flower's own runtime sets.
        message: Message = Message(content=content, metadata=metadata)  # type: ignore[call-overload]
        return message

    def _call(self, content: RecordDict, kind: str, round: int) -> RecordDict:
        reply = self.app(self._message(content, kind, round), self.context)
        if reply.has_error():
            raise RuntimeError(
                f"the ClientApp's {kind} replied with an error: {reply.error.reason}"
            )
        return reply.content

    def _content(
        self, parameters: Mapping[str, npt.NDArray[Any]], config: Mapping[str, Scalar]
    ) -> RecordDict:
        flower = flower_config(config)
        flower["server-round"] = int(config.get("round", 0))
        return RecordDict(
            {ARRAYS_KEY: _array_record(parameters), CONFIG_KEY: ConfigRecord(dict(flower))}
        )

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Send a ``train`` message; the reply's ArrayRecord is the update."""
        names = list(parameters)
        shapes = {k: tuple(np.shape(v)) for k, v in parameters.items()}
        round = int(config.get("round", 0))
        if self.legacy:
            ins = FitIns(
                ndarrays_to_parameters([np.asarray(parameters[n]) for n in names]),
                flower_config(config),
            )
            reply = self._call(fitins_to_recorddict(ins, keep_input=True), "train", round)
            res = recorddict_to_fitres(reply, keep_input=False)
            new = parameters_to_ndarrays(res.parameters)
            if len(new) != len(names):
                raise ValueError(f"the ClientApp returned {len(new)} arrays for {len(names)}")
            return FitResult(
                parameters=dict(zip(names, new, strict=True)),
                num_examples=int(res.num_examples),
                metrics=scalars(res.metrics or {}),
            )
        reply = self._call(self._content(parameters, config), "train", round)
        arrays = _named(_one(reply.array_records, "ArrayRecord", "train"), names, shapes)
        metrics = dict(_one(reply.metric_records, "MetricRecord", "train"))
        return FitResult(
            parameters=arrays,
            num_examples=_num_examples(metrics, "train"),
            metrics=scalars({k: v for k, v in metrics.items() if k != NUM_EXAMPLES_KEY}),
        )

    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Send an ``evaluate`` message; the reply's MetricRecord holds the metrics."""
        round = int(config.get("round", 0))
        if self.legacy:
            ins = EvaluateIns(
                ndarrays_to_parameters([np.asarray(v) for v in parameters.values()]),
                flower_config(config),
            )
            reply = self._call(evaluateins_to_recorddict(ins, keep_input=True), "evaluate", round)
            res = recorddict_to_evaluateres(reply)
            return EvaluateResult(
                num_examples=int(res.num_examples),
                metrics={"loss": float(res.loss), **scalars(res.metrics or {})},
            )
        reply = self._call(self._content(parameters, config), "evaluate", round)
        metrics = dict(_one(reply.metric_records, "MetricRecord", "evaluate"))
        return EvaluateResult(
            num_examples=_num_examples(metrics, "evaluate"),
            metrics=scalars({k: v for k, v in metrics.items() if k != NUM_EXAMPLES_KEY}),
        )


def flower_client(
    target: Any,
    *,
    node_config: Mapping[str, Scalar] | None = None,
    run_config: Mapping[str, Scalar] | None = None,
) -> Client:
    """The fedpriv client for what ``--flower-app`` names: a ClientApp or a ``client_fn``.

    Raises:
        ConfigError: `target` is neither.
    """
    context = Context(
        run_id=0,
        node_id=0,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    if isinstance(target, ClientApp):
        return ClientAppAdapter(target, context)
    if callable(target):
        return from_client_fn(target, context=context)
    raise ConfigError(
        f"--flower-app: expected a flwr ClientApp or a client_fn(context), "
        f"got {type(target).__name__}"
    )


def load_flower_app(
    spec: str,
    *,
    node_config: Mapping[str, Scalar] | None = None,
    run_config: Mapping[str, Scalar] | None = None,
) -> Client:
    """Import ``module:attribute`` (a ClientApp or a ``client_fn``) and adapt it.

    The run config is the ``[tool.flwr.app.config]`` of the Flower project that
    holds the module (the nearest pyproject.toml above it with ``[tool.flwr.app]``),
    with `run_config` over it.

    Raises:
        ConfigError: The target cannot be imported, is neither a ClientApp nor a
            ``client_fn``, or `run_config` names a key the app's config lacks.
    """
    target = load_factory(spec, field="--flower-app")
    module = sys.modules.get(spec.partition(":")[0])
    project = find_project(getattr(module, "__file__", None))
    return flower_client(
        target, node_config=node_config, run_config=run_config_for(project, run_config or {})
    )
