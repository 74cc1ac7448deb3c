"""The fused encode-and-mask pass against the plain codec and the reference mask PRG."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from fedpriv.errors import ConfigError
from fedpriv.privacy.central import secure_generator
from fedpriv.secagg import RingCodec
from fedpriv.secagg.crypto import mask_elements
from fedpriv.secagg.fused import (
    SLICE,
    apply_masks,
    encode_masked,
    secagg_threads,
    threads_available,
)

# Tensors whose sizes cut slices and thread ranges at offsets that are not block-aligned
SIZES = (SLICE + 3, 7, 2 * SLICE - 5, 1)


def tensors(seed: int):
    rng = np.random.default_rng(seed)
    new = [rng.normal(0, 0.01, size).astype(np.float32) for size in SIZES]
    old = [rng.normal(0, 0.01, size).astype(np.float32) for size in SIZES]
    return new, old


@pytest.mark.parametrize("threads", [1, 3])
def test_the_masked_encoding_minus_the_reference_masks_is_the_rounded_update(threads):
    # Arrange
    new, old = tensors(0)
    size = sum(SIZES)
    codec = RingCodec.plan(clip_norm=1.0, size=size, clients=4, threshold=3)
    masks = [(secrets.token_bytes(32), True), (secrets.token_bytes(32), False)]
    out = np.empty(size, np.uint32)
    # Act
    norm = encode_masked(codec, new, old, masks, out, generator=secure_generator, threads=threads)
    # Assert: removing each mask with the reference PRG leaves floor or ceil of s·f·Δ
    for seed, add in masks:
        reference = mask_elements(seed, first=0, count=size)
        if add:
            out -= reference
        else:
            out += reference
    delta = np.concatenate(
        [n.astype(np.float64) - o.astype(np.float64) for n, o in zip(new, old, strict=True)]
    )
    assert norm == pytest.approx(float(np.linalg.norm(delta)))
    scaled = delta * codec.scale * min(1.0, codec.clip_norm / norm)
    rounded = out.view(np.int32).astype(np.float64)
    assert np.all((rounded == np.floor(scaled)) | (rounded == np.ceil(scaled)))
    # Stochastic, not nearest: some elements round away from the nearer integer
    assert np.any(np.abs(rounded - scaled) > 0.5)


def test_a_large_update_is_clipped_to_the_codec_norm():
    new, old = tensors(1)
    new = [n * 1000 for n in new]
    size = sum(SIZES)
    codec = RingCodec.plan(clip_norm=1.0, size=size, clients=4, threshold=3)
    out = np.empty(size, np.uint32)
    encode_masked(codec, new, old, [], out, generator=secure_generator, threads=2)
    rounded = out.view(np.int32).astype(np.float64) / codec.scale
    assert float(np.linalg.norm(rounded)) == pytest.approx(1.0, rel=1e-3)


def test_a_non_finite_update_or_a_size_mismatch_is_refused():
    new, old = tensors(2)
    size = sum(SIZES)
    codec = RingCodec.plan(clip_norm=1.0, size=size, clients=4, threshold=3)
    new[1][0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_masked(codec, new, old, [], np.empty(size, np.uint32), generator=secure_generator)
    with pytest.raises(ValueError, match="elements, the ring"):
        encode_masked(
            codec, new[:2], old[:2], [], np.empty(size, np.uint32), generator=secure_generator
        )


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_adding_then_removing_masks_in_parallel_slices_is_the_identity(threads):
    size = 3 * SLICE + 11
    total = np.random.default_rng(3).integers(0, 2**32, size, dtype=np.uint32)
    before = total.copy()
    masks = [(secrets.token_bytes(32), bool(i % 2)) for i in range(4)]
    apply_masks(total, masks, sign=1, threads=threads)
    assert not np.array_equal(total, before)
    expected = before.copy()
    for seed, add in masks:
        reference = mask_elements(seed, first=0, count=size)
        expected = expected + reference if add else expected - reference
    np.testing.assert_array_equal(total, expected)
    apply_masks(total, masks, sign=-1, threads=threads)
    np.testing.assert_array_equal(total, before)


def test_the_silo_pass_runs_on_one_thread_unless_the_operator_asks_for_more(monkeypatch):
    monkeypatch.delenv("FEDPRIV_SECAGG_THREADS", raising=False)
    assert secagg_threads() == 1
    monkeypatch.setenv("FEDPRIV_SECAGG_THREADS", "0")
    assert secagg_threads() == threads_available()
    monkeypatch.setenv("FEDPRIV_SECAGG_THREADS", "-2")
    with pytest.raises(ConfigError, match="FEDPRIV_SECAGG_THREADS"):
        secagg_threads()


def test_rounding_is_keyed_by_the_generator_alone():
    # The rounding words are AES-CTR under 32 bytes from the generator: the same
    # generator state gives the same encoding, another gives another.
    new, old = tensors(3)
    size = sum(SIZES)
    codec = RingCodec.plan(clip_norm=10.0, size=size, clients=4, threshold=3)
    outs = []
    for seed in (5, 5, 6):
        out = np.empty(size, np.uint32)
        encode_masked(
            codec, new, old, [], out, generator=lambda s=seed: np.random.default_rng(s), threads=1
        )
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
