"""Encryption at rest: the sealed format, keys, and what a wrong key or a changed file gets."""

from __future__ import annotations

import base64
import logging
import os
import pathlib
import struct
import tracemalloc

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.atrest import (
    AtRestKey,
    KeySource,
    Purpose,
    is_sealed,
    read_file,
    seal,
    seal_file,
    write_file,
)
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig, read_checkpoint, write_checkpoint
from fedpriv.coordinator.checkpoint import map_checkpoint
from fedpriv.errors import ConfigError, IntegrityError, StoreError
from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from fedpriv.wire import Model

CHUNK = 1024
HEADER = struct.Struct(">4sBBH8sI16s7s")  # the documented layout, restated independently
RECORD = CHUNK + 16
RUN = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)


@pytest.fixture
def key() -> AtRestKey:
    return AtRestKey.generate()


def _sealed(path: pathlib.Path, data: bytes, key: AtRestKey, purpose=Purpose.LEDGER) -> bytes:
    sealed = b"".join(seal([data], key=key, purpose=purpose, chunk_bytes=CHUNK))
    path.write_bytes(sealed)
    return sealed


def _flip(path: pathlib.Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the format ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_plaintext_of_any_length_round_trips_across_part_boundaries(tmp_path, key, size):
    data = os.urandom(size)
    first = min(3, size)
    middle = max(first, size // 2)
    parts = [data[:first], memoryview(data)[first:middle], data[middle:]]
    path = tmp_path / "f"
    path.write_bytes(b"".join(seal(parts, key=key, purpose=Purpose.LEDGER, chunk_bytes=CHUNK)))
    assert read_file(path, key=key, purpose=Purpose.LEDGER) == data
    # Full chunks, then one shorter last chunk (possibly empty), each with a 16-byte tag.
    assert path.stat().st_size == HEADER.size + (size // CHUNK + 1) * 16 + size


def test_format_matches_its_documentation_and_no_nonce_repeats_under_a_key(tmp_path, key):
    # Arrange: the same plaintext sealed twice, 3.5 chunks each
    data = os.urandom(3 * CHUNK + CHUNK // 2)
    files = [_sealed(tmp_path / name, data, key) for name in ("one", "two")]
    pairs = []
    for sealed in files:
        magic, version, purpose, _, key_id, chunk, salt, prefix = HEADER.unpack_from(sealed)
        assert (magic, version, purpose, chunk) == (b"FPAE", 1, Purpose.LEDGER.value, CHUNK)
        assert key_id.hex() == key.key_id
        # Re-derive the file key and nonces as the documentation states, and open every chunk.
        info = b"fedpriv/v1/atrest/ledger"
        file_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(
            key.secret
        )
        body = sealed[HEADER.size :]
        count = len(body) // RECORD + 1
        opened = b""
        for index in range(count):
            nonce = prefix + struct.pack(">IB", index, index == count - 1)
            record = body[index * RECORD : (index + 1) * RECORD]
            opened += AESGCM(file_key).decrypt(nonce, record, sealed[: HEADER.size])
            pairs.append((file_key, nonce))
        assert opened == data
    # Assert: fresh salt and prefix per file; no (key, nonce) pair used twice
    assert HEADER.unpack_from(files[0])[6:] != HEADER.unpack_from(files[1])[6:]
    assert files[0][HEADER.size :] != files[1][HEADER.size :]
    assert len(pairs) == 8 and len(set(pairs)) == len(pairs)
    assert len({nonce for _, nonce in pairs}) == len(pairs)


def test_a_file_sealed_under_another_key_is_refused_as_a_wrong_key(tmp_path, key):
    path = tmp_path / "ledger.json"
    _sealed(path, b"{}", AtRestKey.generate())
    with pytest.raises(IntegrityError, match="wrong key or the file was modified") as caught:
        read_file(path, key=key, purpose=Purpose.LEDGER)
    assert str(path) in str(caught.value) and key.key_id in str(caught.value)


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(5, id="header-purpose"),
        pytest.param(6, id="header-reserved"),
        pytest.param(9, id="header-key-id"),
        pytest.param(17, id="header-chunk-size"),
        pytest.param(25, id="header-salt"),
        pytest.param(HEADER.size - 1, id="header-nonce-prefix"),
        pytest.param(HEADER.size + RECORD + 100, id="middle-chunk"),
        pytest.param(HEADER.size + 2 * RECORD - 1, id="middle-chunk-tag"),
        pytest.param(-1, id="last-tag"),
    ],
)
def test_a_flipped_byte_anywhere_is_refused(tmp_path, key, offset):
    path = tmp_path / "ledger.json"
    sealed = _sealed(path, os.urandom(3 * CHUNK + 10), key)
    _flip(path, offset % len(sealed))
    with pytest.raises(IntegrityError, match="wrong key or the file was modified") as caught:
        read_file(path, key=key, purpose=Purpose.LEDGER)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda n: n - 1, id="one-byte-short"),
        pytest.param(lambda n: HEADER.size + 2 * RECORD, id="at-a-chunk-boundary"),
        pytest.param(lambda n: HEADER.size + RECORD + 500, id="mid-chunk"),
        pytest.param(lambda n: HEADER.size, id="header-only"),
        pytest.param(lambda n: HEADER.size - 3, id="inside-the-header"),
    ],
)
def test_a_truncated_file_is_refused(tmp_path, key, keep):
    path = tmp_path / "ledger.json"
    sealed = _sealed(path, os.urandom(3 * CHUNK + 10), key)
    path.write_bytes(sealed[: keep(len(sealed))])
    with pytest.raises(IntegrityError, match="truncated|wrong key"):
        read_file(path, key=key, purpose=Purpose.LEDGER)


def test_reordered_dropped_or_appended_chunks_are_refused(tmp_path, key):
    path = tmp_path / "f"
    sealed = _sealed(path, os.urandom(3 * CHUNK + 10), key)
    head, body = sealed[: HEADER.size], sealed[HEADER.size :]
    records = [body[i : i + RECORD] for i in range(0, len(body), RECORD)]
    variants = {
        "swapped": head + records[1] + records[0] + b"".join(records[2:]),
        "dropped": head + records[0] + b"".join(records[2:]),
        "appended": sealed + records[0],
        "spliced from another file": _sealed(tmp_path / "g", os.urandom(4 * CHUNK), key)[
            : HEADER.size + RECORD
        ]
        + b"".join(records[1:]),
    }
    for name, variant in variants.items():
        path.write_bytes(variant)
        with pytest.raises(IntegrityError):
            read_file(path, key=key, purpose=Purpose.LEDGER)
            pytest.fail(name)


def test_a_file_sealed_for_another_purpose_is_refused(tmp_path, key):
    path = tmp_path / "ledger.json.marker"
    _sealed(path, b"{}", key, purpose=Purpose.LEDGER)
    with pytest.raises(IntegrityError, match="wrong key or the file was modified"):
        read_file(path, key=key, purpose=Purpose.LEDGER_MARKER)


def test_a_plain_file_where_a_sealed_one_belongs_is_refused(tmp_path, key):
    path = tmp_path / "ledger.json"
    path.write_bytes(b'{"format": 1}')
    with pytest.raises(IntegrityError, match="is not encrypted, but an encryption key"):
        read_file(path, key=key, purpose=Purpose.LEDGER)


def test_seal_file_encrypts_a_plain_file_in_place_once(tmp_path, key):
    path = tmp_path / "ledger.json"
    data = os.urandom(5 * (1 << 20) + 3)  # several default-sized chunks
    path.write_bytes(data)
    path.chmod(0o600)
    seal_file(path, key=key, purpose=Purpose.LEDGER)
    assert is_sealed(path) and path.stat().st_mode & 0o777 == 0o600
    assert read_file(path, key=key, purpose=Purpose.LEDGER) == data
    with pytest.raises(IntegrityError, match="already encrypted"):
        seal_file(path, key=key, purpose=Purpose.LEDGER)


def test_write_file_is_atomic_and_owner_only(tmp_path, key):
    path = tmp_path / "ledger.json"
    write_file(path, b"hello", key=key, purpose=Purpose.LEDGER)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
    assert b"hello" not in path.read_bytes()


# --- keys and configuration ---------------------------------------------------------------


def test_keys_are_read_as_hex_or_base64_and_never_shown(tmp_path):
    secret = os.urandom(32)
    for text in (secret.hex(), f"  {secret.hex().upper()}\n", base64.b64encode(secret).decode()):
        parsed = AtRestKey.from_text(text, source="test")
        assert parsed.secret == secret
        assert secret.hex() not in repr(parsed) and parsed.key_id in repr(parsed)
    assert AtRestKey.from_text(AtRestKey.generate().to_text(), source="t").secret != secret


@pytest.mark.parametrize(
    "text", ["", "00" * 31, "zz" * 32, base64.b64encode(bytes(16)).decode(), "not a key"]
)
def test_a_malformed_key_is_a_config_error_that_does_not_echo_it(text):
    with pytest.raises(ConfigError, match="expected a 32-byte key") as caught:
        AtRestKey.from_text(text, source="environment variable K")
    assert "environment variable K" in str(caught.value)
    assert not text or text not in str(caught.value)


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "at-rest.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedpriv.atrest"):
        AtRestKey.from_file(path)
    assert "chmod 600" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    AtRestKey.from_file(path)
    assert caplog.text == ""
    with pytest.raises(ConfigError, match="cannot read the encryption key file"):
        AtRestKey.from_file(tmp_path / "missing.key")


def test_key_source_reads_a_file_or_a_variable_and_not_both():
    secret = os.urandom(32)
    assert KeySource(env="K").load(environ={"K": secret.hex()}).secret == secret
    with pytest.raises(ConfigError, match="environment variable K holds no encryption key"):
        KeySource(env="K").load(environ={})
    with pytest.raises(ConfigError, match="not both"):
        KeySource(file=pathlib.Path("k"), env="K")
    with pytest.raises(ConfigError, match="not neither"):
        KeySource()
    with pytest.raises(ConfigError, match="expected an environment variable name"):
        KeySource(env="A-B")


def test_coordinator_and_client_configs_read_the_key_settings(tmp_path):
    coordinator = CoordinatorConfig.from_dict(
        {"model": {"factory": "m:f"}, "store": {"encryption_key_file": "keys/state.key"}},
        base_dir=tmp_path,
    )
    assert coordinator.encryption_key == KeySource(file=tmp_path / "keys/state.key")
    plain = CoordinatorConfig.from_dict({"model": {"factory": "m:f"}}, base_dir=tmp_path)
    assert plain.encryption_key is None
    client = ClientConfig.from_dict(
        {
            "coordinator": {"address": "h:1"},
            "privacy": {"epsilon": 3.0, "ledger": "l.json", "encryption_key_env": "LEDGER_KEY"},
        },
        base_dir=tmp_path,
    )
    assert client.ledger_key == KeySource(env="LEDGER_KEY")
    with pytest.raises(ConfigError, match="are both set"):
        CoordinatorConfig.from_dict(
            {
                "model": {"factory": "m:f"},
                "store": {"encryption_key_file": "k", "encryption_key_env": "K"},
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="without a ledger"):
        ClientConfig.from_dict(
            {"coordinator": {"address": "h:1"}, "privacy": {"encryption_key_env": "K"}},
            base_dir=tmp_path,
        )


# --- checkpoints --------------------------------------------------------------------------


def _model(size: int = 50_000) -> Model:
    arrays = {"w": np.arange(size, dtype=np.float32), "b": np.ones(3, np.float32)}
    return Model.from_arrays(arrays, chunk_bytes=1 << 16)


def test_an_encrypted_checkpoint_reads_back_with_the_plain_digest(tmp_path, key):
    model = _model()
    plain_digest = write_checkpoint(tmp_path / "plain.fpck", model)
    digest = write_checkpoint(tmp_path / "sealed.fpck", model, key=key)
    assert digest == plain_digest  # the committed digest is of the plain bytes
    assert is_sealed(tmp_path / "sealed.fpck")
    for read in (read_checkpoint, map_checkpoint):
        loaded = read(tmp_path / "sealed.fpck", sha256=digest, key=key)
        np.testing.assert_array_equal(loaded.arrays()["w"], model.arrays()["w"])
        assert loaded.layout == model.layout
    with pytest.raises(StoreError, match="SHA-256 differs"):
        read_checkpoint(tmp_path / "sealed.fpck", sha256="0" * 64, key=key)


def test_a_checkpoint_in_the_other_form_is_refused(tmp_path, key):
    model = _model(10)
    write_checkpoint(tmp_path / "plain.fpck", model)
    write_checkpoint(tmp_path / "sealed.fpck", model, key=key)
    with pytest.raises(IntegrityError, match="is not encrypted"):
        read_checkpoint(tmp_path / "plain.fpck", key=key)
    for read in (read_checkpoint, map_checkpoint):
        with pytest.raises(ConfigError, match="is encrypted, but no encryption key"):
            read(tmp_path / "sealed.fpck")
    with pytest.raises(IntegrityError, match="another key"):
        map_checkpoint(tmp_path / "sealed.fpck", key=AtRestKey.generate())


def test_a_changed_byte_in_an_encrypted_checkpoint_loads_nothing(tmp_path, key):
    path = tmp_path / "sealed.fpck"
    write_checkpoint(path, _model(600_000), key=key)  # 2.4 MB: three chunks
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError, match="chunk 1 of 3 does not authenticate"):
        read_checkpoint(path, key=key)


def test_encrypting_and_decrypting_a_checkpoint_holds_no_second_copy(tmp_path, key):
    model = _model(4 << 20)  # 16 MiB payload
    size = model.layout.payload_bytes
    tracemalloc.start()
    try:
        write_checkpoint(tmp_path / "sealed.fpck", model, key=key)
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = read_checkpoint(tmp_path / "sealed.fpck", key=key)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A few 1 MiB chunks in flight, never a second model.
    assert written_peak < 4 << 20
    assert size <= read_peak < size + (4 << 20)
    assert loaded.payload.nbytes == size


# --- the privacy ledger -------------------------------------------------------------------


def test_an_encrypted_ledger_and_marker_reopen_and_hide_their_contents(tmp_path, key):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(epsilon=10.0)
    with PrivacyLedger.open(path, budget=budget, key=key) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        ledger.record(RUN, round=2, max_grad_norm=1.0)
        spent = ledger.spent_epsilon()
    for name in ("ledger.json", "ledger.json.marker"):
        assert is_sealed(tmp_path / name)
        assert b"ledger_id" not in (tmp_path / name).read_bytes()
    with PrivacyLedger.open(path, budget=budget, key=key) as again:
        assert [e.round for e in again.entries] == [1, 2]
        assert again.spent_epsilon() == spent
        # The lock still refuses a second open.
        with pytest.raises(StoreError, match="in use by another process"):
            PrivacyLedger.open(path, budget=budget, key=key)


def test_an_encrypted_ledger_refuses_a_wrong_key_a_flipped_byte_and_a_plain_copy(tmp_path, key):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(epsilon=10.0)
    with PrivacyLedger.open(path, budget=budget, key=key) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
    sealed = path.read_bytes()
    with pytest.raises(IntegrityError, match="another key"):
        PrivacyLedger.open(path, budget=budget, key=AtRestKey.generate())
    with pytest.raises(ConfigError, match="is encrypted, but no encryption key"):
        PrivacyLedger.open(path, budget=budget)
    _flip(path, len(sealed) - 20)
    with pytest.raises(IntegrityError, match="wrong key or the file was modified"):
        PrivacyLedger.open(path, budget=budget, key=key)
    # Neither --reset-ledger nor a plain ledger put in its place gets past the key.
    with pytest.raises(IntegrityError):
        PrivacyLedger.open(path, budget=budget, key=key, reset=True)
    path.write_text('{"format": 1, "delta": 1e-05, "entries": []}')
    with pytest.raises(IntegrityError, match="is not encrypted"):
        PrivacyLedger.open(path, budget=budget, key=key)


def test_an_encrypted_ledger_keeps_its_marker_checks(tmp_path, key):
    path = tmp_path / "ledger.json"
    marker = tmp_path / "ledger.json.marker"
    budget = PrivacyBudget(epsilon=10.0)
    with PrivacyLedger.open(path, budget=budget, key=key) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        older = path.read_bytes()
        ledger.record(RUN, round=2, max_grad_norm=1.0)
    # An older authentic copy is caught by the marker, as without encryption.
    path.write_bytes(older)
    with pytest.raises(StoreError, match="an older copy was restored"):
        PrivacyLedger.open(path, budget=budget, key=key)
    # The ledger passed off as its marker fails: the purpose is authenticated.
    marker.write_bytes(older)
    with pytest.raises(IntegrityError):
        PrivacyLedger.open(path, budget=budget, key=key)
    # A missing ledger whose (encrypted) marker exists is refused, as before.
    path.unlink()
    marker.unlink()
    with PrivacyLedger.open(path, budget=budget, key=key):
        pass
    path.unlink()
    with pytest.raises(StoreError, match="is missing"):
        PrivacyLedger.open(path, budget=budget, key=key)
