"""The TensorBoard sink: scalars in TensorBoard event files, written without torch or TensorFlow.

Imported only when ``[tracking.tensorboard]`` is configured (it imports
``tensorboard``). It writes with TensorBoard's own event-file writer, the one
``torch.utils.tensorboard.SummaryWriter`` wraps, so that the coordinator never
imports torch (about a gigabyte of address space) to log a few numbers.
Scalars are plain ``simple_value`` summaries that every TensorBoard reader
understands; the configuration and the run's end are text summaries.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping

from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[import-untyped]  # tensorboard ships no type hints
from tensorboard.compat.proto.summary_pb2 import (  # type: ignore[import-untyped]  # as above
    Summary,
    SummaryMetadata,
)
from tensorboard.compat.proto.tensor_pb2 import TensorProto  # type: ignore[import-untyped]  # as above
from tensorboard.compat.proto.tensor_shape_pb2 import (  # type: ignore[import-untyped]  # as above
    TensorShapeProto,
)
from tensorboard.compat.proto.types_pb2 import DT_STRING  # type: ignore[import-untyped]  # as above
from tensorboard.summary.writer.event_file_writer import (  # type: ignore[import-untyped]  # as above
    EventFileWriter,
)

from fedpriv.coordinator.tracking.records import RunStatus

__all__ = ["TensorBoardSink"]

# TensorBoard's text plugin renders a string tensor with this plugin name as Markdown.
_TEXT_PLUGIN = "text"


def _text_value(tag: str, text: str) -> Summary.Value:
    tensor = TensorProto(
        dtype=DT_STRING,
        string_val=[text.encode()],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=_TEXT_PLUGIN))
    return Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _markdown_table(params: Mapping[str, str]) -> str:
    escaped = {k: v.replace("|", "\\|") for k, v in params.items()}  # a | would end the cell
    rows = [f"| {k} | {v} |" for k, v in sorted(escaped.items())]
    return "\n".join(["| parameter | value |", "| --- | --- |", *rows])


class TensorBoardSink:
    """Writes one event file per coordinator start into `log_dir` (a ``TrackingSink``).

    Args:
        log_dir: The folder of the event files (created if missing).
    """

    name = "tensorboard"

    def __init__(self, log_dir: pathlib.Path) -> None:
        self._log_dir = log_dir
        self._writer: EventFileWriter | None = None
        self._last_step = 0

    def _write(self, step: int, values: list[Summary.Value]) -> None:
        if self._writer is None:
            raise RuntimeError("the TensorBoard sink was not started")
        self._writer.add_event(
            Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        )
        # Written through at once: the writer's own thread would otherwise hold
        # events for up to two minutes, and report a full disk only later.
        self._writer.flush()

    def start(self, params: Mapping[str, str]) -> None:
        """Open a new event file and record the configuration as a ``config`` text."""
        self._writer = EventFileWriter(str(self._log_dir))
        self._write(0, [_text_value("config", _markdown_table(params))])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Write `values` as scalars at `step`."""
        self._last_step = max(self._last_step, step)
        self._write(step, [Summary.Value(tag=k, simple_value=v) for k, v in values.items()])

    def end(self, status: RunStatus, *, detail: str) -> None:
        """Record how the run ended as a ``run/status`` text at the last step."""
        text = status.value if not detail else f"{status.value}: {detail}"
        self._write(self._last_step, [_text_value("run/status", text)])

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
