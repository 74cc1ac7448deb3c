"""fedpriv.client.hf on tiny GPT-2 models: the loss's records, LoRA, DP-SGD and its accounting."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedpriv.client.hf import (
    IGNORE_INDEX,
    TokenBlocks,
    add_lora,
    causal_lm_client,
    causal_lm_loss,
    logits_of,
    sequence_classifier_client,
)
from fedpriv.errors import ConfigError
from fedpriv.privacy import local
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from fedpriv.privacy.local import GradSampleMode, LocalDP
from tests.hf_models import BLOCK, VOCAB, lora_gpt2, pattern_tokens, tiny_gpt2


def test_each_records_loss_depends_on_that_record_alone():
    # Per-record clipping bounds one record's influence only if no record's loss
    # (and so its gradient) reads another record: neighbouring batches differ in one.
    model = lora_gpt2().eval()
    blocks = TokenBlocks(pattern_tokens(4 * BLOCK, seed=1), block_size=BLOCK)
    ids, mask, labels = (torch.stack(t) for t in zip(*(blocks[i] for i in range(4)), strict=True))
    neighbour = ids.clone()
    neighbour[3] = torch.randint(0, VOCAB, (BLOCK,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = causal_lm_loss(logits_of(model, ids[:3], mask[:3]), labels[:3], "none")
        together = causal_lm_loss(logits_of(model, ids, mask), labels, "none")
        changed = causal_lm_loss(logits_of(model, neighbour, mask), neighbour, "none")
        mean = causal_lm_loss(logits_of(model, ids, mask), labels)
    torch.testing.assert_close(together[:3], alone)
    torch.testing.assert_close(changed[:3], alone)
    assert not torch.isclose(changed[3], together[3])
    assert float(mean) == pytest.approx(float(together.mean()))


def test_the_loss_weighs_records_equally_and_skips_ignored_positions():
    logits = torch.zeros(2, 6, 4)
    logits[0, :, 1] = 5.0  # record 0 predicts token 1 everywhere
    labels = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, IGNORE_INDEX, IGNORE_INDEX, 1, 1]])
    per_record = causal_lm_loss(logits, labels, "none")
    confident = -math.log(math.exp(5) / (math.exp(5) + 3))
    assert per_record.tolist() == pytest.approx([confident, math.log(4)])
    empty = torch.full((1, 6), IGNORE_INDEX)
    assert causal_lm_loss(torch.zeros(1, 6, 4), empty, "none").tolist() == [0.0]


def test_token_blocks_cut_a_stream_into_equal_records():
    blocks = TokenBlocks(list(range(37)), block_size=8)
    assert len(blocks) == 4
    ids, mask, labels = blocks[3]
    assert ids.tolist() == list(range(24, 32)) and mask.tolist() == [1] * 8
    assert torch.equal(labels, ids)
    with pytest.raises(ConfigError, match="do not fill one block"):
        TokenBlocks([1, 2, 3], block_size=8)


def test_lora_freezes_the_base_and_only_adapters_are_exchanged():
    client = causal_lm_client(
        lora_gpt2(), train=TokenBlocks(pattern_tokens(8 * BLOCK, seed=2), block_size=BLOCK)
    )
    shapes = client.model_shapes()
    assert shapes and all(".lora_A." in name or ".lora_B." in name for name in shapes)
    adapter = sum(math.prod(s) for s in shapes.values())
    whole = sum(p.numel() for p in client.model.parameters())
    assert adapter == 2 * (32 * 4 + 4 * 96)  # 2 layers x (A, B) of c_attn at rank 4
    assert adapter < whole / 20


def _client(privacy=None, *, physical=None, seed=3, records=64):
    train = TokenBlocks(pattern_tokens(records * BLOCK, seed=seed), block_size=BLOCK)
    val = TokenBlocks(pattern_tokens(16 * BLOCK, seed=seed + 100), block_size=BLOCK)
    if privacy is not None and physical is not None:
        privacy = dataclasses.replace(privacy, max_physical_batch_size=physical)
    return causal_lm_client(
        lora_gpt2(),
        train=train,
        val=val,
        batch_size=32,
        learning_rate=0.02,
        epochs=2,
        privacy=privacy,
        device="cpu",
    )


def _params(client):
    return {k: v.detach().numpy().copy() for k, v in client._exchanged().items()}


def test_lora_fine_tuning_lowers_the_perplexity():
    client = _client()
    start = _params(client)
    before = client.evaluate(start, config={})
    result = client.fit(start, config={"round": 1, "epochs": 6})
    after = client.evaluate(result.parameters, config={})
    assert after.metrics["perplexity"] < 0.85 * before.metrics["perplexity"]
    assert before.metrics["perplexity"] == pytest.approx(math.exp(before.metrics["loss"]))


class RecordingEngine(local.PrivacyEngine):
    """Opacus' own engine; keeps itself so the test can ask its accountant."""

    made: list[local.PrivacyEngine] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingEngine.made.append(self)


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_dp_lora_ledger_epsilon_is_opacus_own_for_the_steps_taken_split_or_not(
    monkeypatch, tmp_path, mode
):
    # Arrange: one logical batch of 32 expected records, trained whole and in physical
    # batches of 4; Opacus' engine counts the noised steps it really takes.
    monkeypatch.setattr(local, "PrivacyEngine", RecordingEngine)
    dp = LocalDP(noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode=mode)
    epsilons, steps = [], []
    for physical in (None, 4):
        RecordingEngine.made.clear()
        client = _client(dp, physical=physical)
        plan = client.plan_privacy({"epochs": 2})
        # Act
        client.fit(_params(client), config={"round": 1})
        # Assert: Opacus accounted exactly the planned mechanism
        (engine,) = RecordingEngine.made
        assert engine.accountant.history == [(1.1, plan.sample_rate, plan.steps)]
        with PrivacyLedger.open(
            tmp_path / f"ledger-{physical}.json", budget=PrivacyBudget(epsilon=50.0)
        ) as ledger:
            ledger.record(plan, round=1, max_grad_norm=1.0)
            ours = ledger.spent_epsilon_rdp()
        assert ours == pytest.approx(engine.get_epsilon(ledger.budget.delta), rel=1e-6)
        epsilons.append(ours)
        steps.append(plan.steps)
    assert plan.sample_rate == pytest.approx(32 / 64)
    assert epsilons[0] == epsilons[1] and steps[0] == steps[1] == 4


def test_dp_lora_trains_and_clips_each_block():
    dp = LocalDP(noise_multiplier=0.5, max_grad_norm=1.0)
    client = _client(dp)
    start = _params(client)
    result = client.fit(start, config={"round": 1, "epochs": 6})
    assert np.isfinite(result.metrics["train_loss"])
    moved = [float(np.abs(result.parameters[k] - start[k]).max()) for k in start]
    assert max(moved) > 0  # the adapters moved (noise alone would, too: it is DP)


def test_dp_names_a_trainable_layer_that_sees_no_batch_dimension():
    # GPT-2's position embedding reads position_ids of shape (1, L), broadcast over
    # the batch: Opacus cannot split its gradient per record.
    model = tiny_gpt2(tie=False)
    train = TokenBlocks(pattern_tokens(8 * BLOCK, seed=2), block_size=BLOCK)
    with pytest.raises(
        ConfigError, match=r"layer transformer\.wpe \(Embedding\).*first dimension is 1"
    ):
        causal_lm_client(model, train=train, privacy=LocalDP(noise_multiplier=1.0))


def test_ghost_clipping_names_tied_trainable_weights():
    model = tiny_gpt2(tie=True)
    model.transformer.wpe.requires_grad_(False)
    train = TokenBlocks(pattern_tokens(8 * BLOCK, seed=2), block_size=BLOCK)
    with pytest.raises(
        ConfigError, match=r"transformer\.wte\.weight and lm_head\.weight.*tied weights"
    ):
        causal_lm_client(model, train=train, privacy=LocalDP(noise_multiplier=1.0))
    # the same model without DP trains as it is
    causal_lm_client(tiny_gpt2(tie=True), train=train)


def test_sequence_classifier_with_a_lora_and_head_learns_under_dp():
    model = add_lora(tiny_gpt2(classes=2), rank=4, alpha=8, train_head=True)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (96, BLOCK), generator=generator)
    labels = (ids[:, 0] > VOCAB // 2).long()
    records = TensorDataset(ids, torch.ones_like(ids), labels)
    client = sequence_classifier_client(
        model,
        train=records,
        val=records,
        batch_size=32,
        learning_rate=0.05,
        privacy=LocalDP(noise_multiplier=0.3, max_grad_norm=1.0),
        device="cpu",
    )
    names = set(client.model_shapes())
    assert any("score" in n for n in names) and any("lora_A" in n for n in names)
    start = _params(client)
    result = client.fit(start, config={"round": 1, "epochs": 4})
    assert client.evaluate(result.parameters, config={}).metrics["accuracy"] > 0.5


def test_dict_records_train_as_tuples_do_with_dp():
    # A Hugging Face dataset in torch format yields dicts; the client takes them as is.
    blocks = TokenBlocks(pattern_tokens(64 * BLOCK, seed=3), block_size=BLOCK)
    dicts = [{"input_ids": ids, "attention_mask": mask} for ids, mask, _ in blocks]
    client = causal_lm_client(
        lora_gpt2(),
        train=dicts,
        val=dicts[:8],
        batch_size=32,
        privacy=LocalDP(noise_multiplier=1.0),
    )
    assert client.plan_privacy({"epochs": 1}).sample_rate == pytest.approx(0.5)
    result = client.fit(_params(client), config={"round": 1})
    assert np.isfinite(result.metrics["train_loss"])
    assert client.evaluate(result.parameters, config={}).metrics["perplexity"] > 1
    with pytest.raises(ConfigError, match="record 0 has no input_ids"):
        causal_lm_client(lora_gpt2(), train=[{"text": "x"}]).fit(_params(client), config={})
