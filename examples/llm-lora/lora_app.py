"""DP LoRA fine-tuning of a GPT-2-architecture model: the silo app and the base model.

- The base model: any causal language model in a local folder
  (``save_pretrained``'s layout). Without one, :func:`prepare_base` builds a small
  GPT-2 (4 layers, width 128) with a byte-level BPE tokenizer and pretrains it on
  public text, the docstrings of Python's standard library, which ships with every
  Python. Nothing is downloaded.
- Each silo's private text: a share of this repository's Markdown files (as in
  examples/lm), the last 10% of each file held out.
- Each silo trains LoRA adapters (rank 8 on the attention projections) with DP-SGD;
  the base stays frozen on the silo and only the adapters travel.

The silos load this module as ``lora_app:make_client`` (examples/llm-lora on
PYTHONPATH); run.py does that.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from transformers.utils import logging as hf_logging  # noqa: E402

from examples.lm.app import public_text, silo_text  # noqa: E402
from fedpriv._types import Scalar  # noqa: E402
from fedpriv.client.hf import (  # noqa: E402
    TokenBlocks,
    TransformersClient,
    add_lora,
    causal_lm_client,
    load_pretrained,
)
from fedpriv.privacy.local import LocalDP  # noqa: E402

# Progress bars and notes from transformers would fill the silos' logs.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

BLOCK = 64
SEED = 5
LORA_RANK = 8


def prepare_base(directory: pathlib.Path, *, steps: int, vocab: int = 1024) -> float:
    """Pretrain the small GPT-2 on public text into `directory`; its final training loss."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = public_text()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=BLOCK,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    blocks = TokenBlocks(tokenizer(text)["input_ids"], block_size=BLOCK)
    loader = torch.utils.data.DataLoader(
        blocks, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    done, loss_value = 0, math.nan
    while done < steps:
        for ids, mask, labels in loader:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value, done = float(loss.detach()), done + 1
            if done == steps:
                break
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return loss_value


def _blocks(tokenizer: Any, text: str) -> TokenBlocks:
    return TokenBlocks(tokenizer(text)["input_ids"], block_size=BLOCK)


def make_model(model_dir: str) -> torch.nn.Module:
    """The base model from `model_dir` with fresh LoRA adapters (the same for every silo)."""
    model, _ = load_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return add_lora(model, rank=LORA_RANK, alpha=2 * LORA_RANK)


def make_client(config: Mapping[str, Scalar]) -> TransformersClient:
    """Silo `config['silo_index']` of `config['num_silos']`, with DP-SGD on its own text.

    ``[app]`` keys: ``model_dir``, ``silo_index``, ``num_silos``, ``target_epsilon``,
    ``planned_rounds``, ``delta``, ``max_grad_norm``, ``batch_size``, ``lr``,
    ``epochs``, ``physical_batch`` (split each Poisson batch to bound memory).
    """
    model_dir = str(config["model_dir"])
    index = int(config.get("silo_index", 0))
    num_silos = int(config.get("num_silos", 3))
    _, tokenizer = load_pretrained(model_dir)
    train, held_out = silo_text(index, num_silos)
    physical = int(config.get("physical_batch", 0)) or None
    privacy = LocalDP(
        max_grad_norm=float(config.get("max_grad_norm", 1.0)),
        target_epsilon=float(config.get("target_epsilon", 8.0)),
        planned_rounds=int(config.get("planned_rounds", 3)),
        delta=float(config.get("delta", 1e-5)),
        max_physical_batch_size=physical,
    )
    return causal_lm_client(
        make_model(model_dir),
        train=_blocks(tokenizer, train),
        val=_blocks(tokenizer, held_out),
        batch_size=int(config.get("batch_size", 32)),
        learning_rate=float(config.get("lr", 0.01)),
        epochs=int(config.get("epochs", 2)),
        privacy=privacy,
    )


def held_out_perplexity(
    model_dir: str, adapters: Mapping[str, Any], *, num_silos: int
) -> list[float]:
    """Each silo's held-out perplexity (per token) with these adapters on the base."""
    _, tokenizer = load_pretrained(model_dir)
    model = make_model(model_dir)
    client = causal_lm_client(model, train=_blocks(tokenizer, public_text()[:20_000]))
    out = []
    for index in range(num_silos):
        client.val_loader = torch.utils.data.DataLoader(
            _blocks(tokenizer, silo_text(index, num_silos)[1]), batch_size=32
        )
        out.append(float(client.evaluate(adapters, config={}).metrics["perplexity"]))
    return out
