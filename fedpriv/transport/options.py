"""gRPC channel and server options, each with its reason."""

from __future__ import annotations

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_ADDRESS",
    "DEFAULT_POLL_WAIT_S",
    "DEFAULT_RECONNECT_TIMEOUT_S",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_BYTES",
    "SERVER_OPTIONS",
]

# Where a coordinator listens, and where a silo looks for it, unless configured: loopback only.
DEFAULT_ADDRESS = "127.0.0.1:7443"
# Longest a PullTask long-poll waits before the coordinator answers WAIT (both sides' default).
DEFAULT_POLL_WAIT_S = 30
# How long a silo keeps retrying a coordinator it cannot reach before it gives up.
DEFAULT_RECONNECT_TIMEOUT_S = 300.0

# A chunk is at most 4 MiB (fedpriv.wire.MAX_CHUNK_BYTES; a test keeps this larger) and
# headers of models with many tensors add a little. gRPC's default 4 MiB receive limit
# would reject a full chunk plus its framing.
MAX_MESSAGE_BYTES = 8 << 20
# Metadata a coordinator accepts on one call (gRPC's default soft limit, as a hard one).
MAX_METADATA_BYTES = 8 << 10

_COMMON: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    *_COMMON,
    # Long-polls sit idle for up to a minute; datacenter NAT and firewalls drop
    # idle TCP flows after a few minutes, so ping every 30 s to keep the path open.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a coordinator restart; the SDK adds its own backoff on top.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# Keepalive enforcement, stream and connection caps come from the [limits] table
# (fedpriv.transport.limits.ServerLimits.server_options).
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    *_COMMON,
    # A call's metadata (fedpriv-session, fedpriv-silo, gRPC's own) needs well under 1 KiB;
    # beyond 8 KiB a call is refused with RESOURCE_EXHAUSTED (docs/protocol.md). Both limits:
    # between gRPC's soft and hard limits a call is refused only at random.
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    # A model upload may take minutes; never cut a connection for its age.
    ("grpc.max_connection_age_ms", 2**31 - 1),
    # Bandwidth-delay-product probing grows each connection's receive window; with
    # eight silos uploading at once the server then buffered tens of MB per connection.
    # Off, coordinator peak RSS at P = 10M, N = 8 fell from 388 MB to 293 MB with no
    # change in round time (docs/decisions.md). Measured on loopback only: over links
    # with a long round-trip time the fixed window may bound a single upload's rate.
    ("grpc.http2.bdp_probe", 0),
]
