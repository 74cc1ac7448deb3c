"""fedpriv's own noise (central Gaussian, distributed Skellam, stochastic rounding) comes from a
cryptographic keystream keyed from the OS CSPRNG. The statistics here are a smoke check; the
security rests on AES-CTR / ChaCha20 and the key's secrecy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedpriv.privacy.central import _keystream_bit_generator, add_gaussian_noise, secure_generator
from fedpriv.secagg import RingCodec

DRAWS = 1_000_000


def test_output_is_an_aes_ctr_keystream_or_chacha20():
    generator = secure_generator()
    bit_generator = generator.bit_generator
    name = type(bit_generator).__name__
    if name == "ChaCha":  # no AES instructions on this CPU
        assert bit_generator.state["state"]["rounds"] == 20
        return
    assert name == "AESCounter"
    # Whoever holds the key can recompute the output: AES-128 of counter blocks 0, 1, 2, ...
    words = bit_generator.state["s"]["seed"]
    key = (int(words[0]) | int(words[1]) << 64).to_bytes(16, "little")
    blocks = b"".join(i.to_bytes(16, "little") for i in range(64))
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    keystream = encryptor.update(blocks) + encryptor.finalize()
    raw = bit_generator.random_raw(len(keystream) // 8).astype("<u8").tobytes()
    assert raw == keystream


def test_without_aes_instructions_the_fallback_is_chacha20():
    bit_generator = _keystream_bit_generator(prefer_aes=False)
    assert type(bit_generator).__name__ == "ChaCha"
    assert bit_generator.state["state"]["rounds"] == 20
    other = _keystream_bit_generator(prefer_aes=False)
    assert not np.array_equal(bit_generator.random_raw(4), other.random_raw(4))


def test_no_global_or_fixed_seed_reproduces_the_output():
    draws = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(secure_generator().random(16))
    assert not np.array_equal(draws[0], draws[1])
    for seed in range(8):
        for guess in (
            np.random.default_rng(seed),
            np.random.Generator(np.random.PCG64DXSM(seed)),
            np.random.RandomState(seed),
        ):
            assert not np.array_equal(draws[0], guess.random(16))


def test_two_generators_differ_and_each_call_draws_a_new_key():
    a, b = secure_generator(), secure_generator()
    assert not np.array_equal(a.bit_generator.random_raw(8), b.bit_generator.random_raw(8))
    assert not np.array_equal(a.standard_normal(8), b.standard_normal(8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_central_noise_has_the_requested_mean_and_variance(dtype):
    values = np.full(DRAWS, 3.0, dtype)
    add_gaussian_noise(values, stddev=2.5, rng=secure_generator())
    noise = values.astype(np.float64) - 3.0
    # Standard errors: 2.5 / 1000 on the mean, 2.5² · √(2 / 1e6) ≈ 0.0088 on the variance.
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.0125)
    assert float(noise.var()) == pytest.approx(6.25, abs=0.045)
    # Gaussian tails, not merely the right variance: kurtosis 3.
    assert float(((noise / 2.5) ** 4).mean()) == pytest.approx(3.0, abs=0.05)


def test_skellam_noise_and_rounding_uniforms_are_sane():
    codec = RingCodec(clip_norm=1.0, scale=1000.0, size=DRAWS, noise_variance=2e6)
    ring, _ = codec.encode(np.zeros(DRAWS), rng=secure_generator())
    noise = ring.view(np.int32).astype(np.float64)  # a zero update rounds to zero
    # Skellam(μ/2, μ/2): mean 0, variance μ, kurtosis 3 + 1/μ.
    assert float(noise.mean()) == pytest.approx(0.0, abs=5 * (2e6 / DRAWS) ** 0.5)
    assert float(noise.var()) == pytest.approx(2e6, rel=0.01)
    assert float(((noise / 2e6**0.5) ** 4).mean()) == pytest.approx(3.0, abs=0.05)
    uniforms = secure_generator().random(DRAWS, dtype=np.float32)
    assert 0.0 <= float(uniforms.min()) and float(uniforms.max()) < 1.0
    assert float(uniforms.mean()) == pytest.approx(0.5, abs=0.0015)
    assert float(uniforms.var()) == pytest.approx(1 / 12, rel=0.01)


def test_skellam_noise_at_the_planned_variance_is_skellam():
    codec = RingCodec.plan(clip_norm=1.0, size=DRAWS, clients=3, threshold=2, noise_multiplier=1.0)
    ring, _ = codec.encode(np.zeros(DRAWS), rng=secure_generator())
    noise = ring.view(np.int32).astype(np.float64)
    assert float(noise.var()) == pytest.approx(codec.noise_variance, rel=0.01)


@pytest.mark.parametrize("value", [2.3, -2.3])
def test_stochastic_rounding_is_unbiased(value):
    codec = RingCodec(clip_norm=1e9, scale=1.0, size=DRAWS, noise_variance=0.0)
    ring, _ = codec.encode(np.full(DRAWS, value), rng=secure_generator())
    rounded = ring.view(np.int32)
    low = math.floor(value)
    assert set(np.unique(rounded).tolist()) == {low, low + 1}
    assert float(rounded.mean()) == pytest.approx(value, abs=5 * (0.21 / DRAWS) ** 0.5)
