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
    WIDE_SLICE,
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
    size = 2 * WIDE_SLICE + 3 * SLICE + 11  # wide slices cut at offsets not block-aligned
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


def _worst_case_codec(size: int, noise_variance: float) -> RingCodec:
    # Every element at norm C / sqrt(d) with a fractional part of 1/2: stochastic
    # rounding's norm then exceeds sC by the most, and often exceeds the bound.
    return RingCodec(
        clip_norm=1.0, scale=200.5 * size**0.5, size=size, noise_variance=noise_variance
    )


def test_with_noise_every_rounded_update_is_within_the_accounted_sensitivity():
    # The sensitivity of the Skellam sum is codec.l2_sensitivity: each silo's rounded
    # update (its noise aside) must lie within it, however the rounding falls.
    size = 4096
    codec = _worst_case_codec(size, noise_variance=1e-12)  # Poisson(5e-13): zero noise
    new = [np.full(size, 1.0 / size**0.5, np.float32)]
    old = [np.zeros(size, np.float32)]
    bound = codec.l2_sensitivity
    plain_exceeds = 0
    for _ in range(200):
        out = np.empty(size, np.uint32)
        encode_masked(codec, new, old, [], out, generator=secure_generator, threads=1)
        assert float(np.linalg.norm(out.view(np.int32).astype(np.float64))) <= bound
        plain = np.floor(new[0] * codec.scale + secure_generator().random(size))
        plain_exceeds += float(np.linalg.norm(plain)) > bound
    # the case is one where unconditioned rounding does exceed the bound
    assert plain_exceeds > 0


def test_the_norm_bound_is_checked_with_noise_and_not_without(monkeypatch):
    size = 1024
    new = [np.full(size, 0.01, np.float32)]
    old = [np.zeros(size, np.float32)]
    monkeypatch.setattr(RingCodec, "l2_sensitivity", property(lambda self: 0.5))
    with pytest.raises(RuntimeError, match="conditional rounding"):
        encode_masked(
            _worst_case_codec(size, 1e-12),
            new,
            old,
            [],
            np.empty(size, np.uint32),
            generator=secure_generator,
        )
    # without noise no sensitivity is accounted: one draw of the rounding is kept
    encode_masked(
        _worst_case_codec(size, 0.0),
        new,
        old,
        [],
        np.empty(size, np.uint32),
        generator=secure_generator,
    )


def test_on_several_threads_wide_slices_encode_what_one_thread_does():
    # Several threads take wide slices; the masked encoding stays exactly the
    # rounded update plus the reference masks, across wide-slice boundaries.
    rng = np.random.default_rng(4)
    sizes = (WIDE_SLICE + 5, 3, WIDE_SLICE - 7)
    new = [rng.normal(0, 0.01, n).astype(np.float32) for n in sizes]
    old = [rng.normal(0, 0.01, n).astype(np.float32) for n in sizes]
    size = sum(sizes)
    codec = RingCodec.plan(clip_norm=1.0, size=size, clients=4, threshold=3)
    masks = [(secrets.token_bytes(32), True), (secrets.token_bytes(32), False)]
    out = np.empty(size, np.uint32)
    norm = encode_masked(codec, new, old, masks, out, generator=secure_generator, threads=2)
    for seed, add in masks:
        reference = mask_elements(seed, first=0, count=size)
        out = out - reference if add else out + reference
    delta = np.concatenate([n.astype(np.float64) - o for n, o in zip(new, old, strict=True)])
    scaled = delta * codec.scale * min(1.0, codec.clip_norm / norm)
    rounded = out.view(np.int32).astype(np.float64)
    assert np.all((rounded == np.floor(scaled)) | (rounded == np.ceil(scaled)))
