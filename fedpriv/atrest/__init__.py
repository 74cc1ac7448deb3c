"""Encryption at rest: AES-256-GCM for checkpoints and privacy ledgers, streamed in chunks.

A sealed file is a header followed by the payload in sealed chunks::

    header   magic "FPAE" | version u8 | purpose u8 | reserved u16
             | key id 8 B | chunk bytes u32 | salt 16 B | nonce prefix 7 B
    chunk i  AES-256-GCM(file key, nonce = prefix | i (u32, big-endian) | last (u8),
                         plaintext[i * chunk : (i + 1) * chunk], aad = header)

The header is every chunk's associated data. Every chunk but the last holds
exactly ``chunk bytes``; the last holds fewer (possibly none) and is flagged in
its nonce, so a file cut, extended or reordered anywhere fails a tag. The file
key is HKDF-SHA256 of the key under the file's fresh random salt, with the
purpose as info: with the counter, no (key, nonce) pair is ever used twice.
The key id (8 bytes of SHA-256 of the key under a label) tells a wrong key from
a damaged file. docs/encryption-at-rest.md describes the format in full.

Files are written and read a chunk (1 MiB) at a time: a checkpoint of several
GB is never held twice. A wrong key, a modified or truncated file, or a plain
file where a sealed one is expected raise :class:`IntegrityError`, and nothing
is loaded. Like ``pki/`` and ``secagg/``, this is a recipe module: the only
other place that imports ``cryptography.hazmat``.
"""

from __future__ import annotations

from fedpriv.atrest.keys import KEY_BYTES, AtRestKey, KeySource, Purpose
from fedpriv.atrest.sealed import (
    DEFAULT_CHUNK_BYTES,
    SealedReader,
    is_sealed,
    read_file,
    refuse_sealed,
    seal,
    seal_file,
    write_file,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "KEY_BYTES",
    "AtRestKey",
    "KeySource",
    "Purpose",
    "SealedReader",
    "is_sealed",
    "read_file",
    "refuse_sealed",
    "seal",
    "seal_file",
    "write_file",
]
