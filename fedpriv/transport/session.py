"""A silo's session id: one random value per running silo, sent with every Fleet call.

The coordinator keeps one session per identity. A channel that reconnects (a
new TCP connection, so a new peer address) keeps its process's session id and
stays the same session; a second process under the same certificate draws
another id and is told apart. A caller that sends no id (another SDK, a raw
stub) is identified by its peer address instead.
"""

from __future__ import annotations

import re
import secrets

import grpc

from fedpriv.errors import ProtocolError
from fedpriv.transport.server import with_metadata

__all__ = ["SESSION_KEY", "new_session_id", "session_key", "with_session"]

# Metadata key of the session id on every Fleet call.
SESSION_KEY = "fedpriv-session"
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A fresh session id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def session_key(context: grpc.ServicerContext) -> str:
    """The caller's session: ``id:<hex>`` from its metadata, else ``peer:<address>``.

    Raises:
        ProtocolError: The metadata carries a malformed session id.
    """
    for key, value in context.invocation_metadata():
        if key == SESSION_KEY:
            if not isinstance(value, str) or not _SESSION_ID.fullmatch(value):
                raise ProtocolError(f"{SESSION_KEY} metadata must be 32 lowercase hex digits")
            return f"id:{value}"
    return f"peer:{context.peer()}"


def with_session(channel: grpc.Channel, session_id: str) -> grpc.Channel:
    """`channel`, sending `session_id` (from :func:`new_session_id`) with every call.

    Raises:
        ValueError: `session_id` is not 32 lowercase hex digits.
    """
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError("a session id is 32 lowercase hex digits (new_session_id())")
    return with_metadata(channel, (SESSION_KEY, session_id))
