"""Tiny Hugging Face models built from configs (random initialisation, no download)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

VOCAB, BLOCK = 64, 16


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build with torch's global generator at `seed`, then put it back as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_gpt2(*, seed: int = 7, tie: bool = True, classes: int | None = None) -> torch.nn.Module:
    """A two-layer GPT-2 of 64 tokens: the same 'pretrained' weights for every `seed`."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # Embeddings of a trained model's scale (a frozen, tied head at GPT-2's
        # 0.02 caps every logit near 0.6: no adapter could lower the perplexity).
        initializer_range=0.3,
    )
    with seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if classes is None:
            return GPT2LMHeadModel(config)
        config.num_labels = classes
        return GPT2ForSequenceClassification(config)


def lora_gpt2() -> torch.nn.Module:
    """The tiny GPT-2 with rank-4 LoRA adapters on its attention (the coordinator's factory)."""
    from fedpriv.client.hf import add_lora

    with seeded(11):
        return add_lora(tiny_gpt2(), rank=4, alpha=8)


def pattern_tokens(count: int, *, seed: int) -> torch.Tensor:
    """A learnable stream: short repeated phrases over the vocabulary, shuffled by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(1, VOCAB, (5,), generator=generator) for _ in range(6)]
    order = torch.randint(0, len(phrases), (count // 5 + 1,), generator=generator)
    return torch.cat([phrases[int(i)] for i in order])[:count]
