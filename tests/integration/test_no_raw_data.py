"""No training example ever crosses the wire: every byte a silo sends is recorded and searched."""

from __future__ import annotations

import socket
import threading

import numpy as np
import torch

from examples.digits import app
from fedpriv.coordinator import Coordinator, ModelSource
from tests.helpers import make_config, silo_thread, wait_silos

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def http2_data_streams(raw: bytes) -> dict[int, bytes]:
    """Reassemble the DATA frames of one client-to-server HTTP/2 connection, per stream."""
    assert raw.startswith(H2_PREFACE)
    position, streams = len(H2_PREFACE), {}
    while position + 9 <= len(raw):
        length = int.from_bytes(raw[position : position + 3], "big")
        kind, flags = raw[position + 3], raw[position + 4]
        stream = int.from_bytes(raw[position + 5 : position + 9], "big") & 0x7FFFFFFF
        payload = raw[position + 9 : position + 9 + length]
        if kind == 0:  # DATA
            if flags & 0x8:  # PADDED
                payload = payload[1 : len(payload) - payload[0]]
            streams[stream] = streams.get(stream, b"") + payload
        position += 9 + length
    assert position == len(raw), "recording ends inside a frame"
    return streams


class RecordingProxy:
    """TCP proxy on 127.0.0.1 that forwards both ways and records what clients send."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[bytearray] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            record = bytearray()
            with self._lock:
                self.connections.append(record)
            threading.Thread(
                target=self._pipe, args=(client, upstream, record), daemon=True
            ).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        try:
            while data := source.recv(1 << 16):
                if record is not None:
                    record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def recorded_federation(config, clients):
    """Two plain-text silos (silo-a, silo-b) through a RecordingProxy until the end.

    Returns the silos' stats, the raw bytes of every connection they opened, and
    the reassembled gRPC messages they sent.
    """
    with Coordinator(config, insecure=True) as coordinator:
        proxy = RecordingProxy(coordinator.port)
        with (
            silo_thread(
                clients[0], port=proxy.port, tls=None, insecure=True, identity="silo-a"
            ) as a,
            silo_thread(
                clients[1], port=proxy.port, tls=None, insecure=True, identity="silo-b"
            ) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            stats = wait_silos([a, b])
        proxy.close()
    raw = [bytes(c) for c in proxy.connections]
    messages = [data for connection in raw for data in http2_data_streams(connection).values()]
    return stats, raw, messages


class RecordingClient:
    """Wraps a TorchClient and keeps the bytes of the update it returned (positive control)."""

    def __init__(self, inner):
        self.inner = inner
        self.update_bytes: list[bytes] = []

    def fit(self, parameters, *, config):
        result = self.inner.fit(parameters, config=config)
        self.update_bytes.append(np.ascontiguousarray(result.parameters["6.weight"]).tobytes())
        return result

    def evaluate(self, parameters, *, config):
        return self.inner.evaluate(parameters, config=config)


def test_no_training_sample_bytes_in_anything_a_silo_sends(tmp_path):
    # Arrange: plain text so the recorded bytes are exactly what the coordinator would read
    torch.set_num_threads(1)
    features, labels = app.load_digits_arrays()
    trains, _ = app.split_non_iid(labels, num_silos=2)
    config = make_config(tmp_path, None, {"x": np.zeros(1, np.float32)}, num_rounds=2)
    config = type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "model": ModelSource(factory="examples.digits.app:make_model"),
        }
    )
    clients = [
        RecordingClient(app.make_client({"silo_index": k, "num_silos": 2})) for k in range(2)
    ]
    # Act
    stats, raw, messages = recorded_federation(config, clients)
    # Assert: the recording holds the plaintext updates (so a leak would be visible)...
    assert all(s.trained == 2 for s in stats)
    assert sum(len(m) for m in messages) > sum(s.bytes_sent for s in stats)
    for client in clients:
        for update in client.update_bytes:
            assert any(update in m for m in messages)
    # ...and not one training example, as float32 (how the silo holds it) or float64,
    # in the reassembled gRPC messages or in the raw bytes (headers included).
    for index in np.concatenate(trains):
        for row in (features[index].tobytes(), features[index].astype(np.float64).tobytes()):
            assert not any(row in m for m in messages)
            assert not any(row in r for r in raw)
