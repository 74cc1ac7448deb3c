"""Hugging Face transformers in a silo: causal language models and sequence classifiers.

Install the extra first: ``pip install 'fedpriv[hf]'`` (transformers, peft,
safetensors). A silo loads its model from a local folder
(:func:`load_pretrained`, never a hub download), optionally adds LoRA adapters
(:func:`add_lora`), and wraps it in a :class:`TransformersClient` built by
:func:`causal_lm_client` or :func:`sequence_classifier_client`. With LoRA the
base weights are frozen, so only the adapters travel (``exchange =
"trainable"``, the default on both sides): a federation of a multi-billion
parameter model moves megabytes per round.

Records are ``(input_ids, attention_mask, labels)``, one row each, as tuples or
as dicts with those keys (a Hugging Face dataset in torch format; see
:class:`DictRecords`). :class:`TokenBlocks` cuts a token stream into such records
for language modelling; :func:`classification_records` pads texts for a
classifier.

With DP-SGD (``privacy=LocalDP(...)``) the unit of privacy is one record: one
block of text, or one classified text. Opacus clips each record's gradient
(ghost clipping by default; LoRA's layers are ``nn.Linear``, which it clips
without per-record gradients), and the silo's ledger accounts every round as
for any TorchClient. A model Opacus cannot clip per record is refused when the
client is built, naming the layer (:mod:`fedpriv.privacy.layers`).
"""

from __future__ import annotations

import math
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedpriv._types import Scalar
from fedpriv.client.base import EvaluateResult
from fedpriv.client.precision import Precision
from fedpriv.client.torch import TorchClient
from fedpriv.errors import ConfigError
from fedpriv.privacy.local import LocalDP

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "IGNORE_INDEX",
    "DictRecords",
    "TokenBlocks",
    "TransformersClient",
    "add_lora",
    "as_records",
    "causal_lm_client",
    "causal_lm_loss",
    "classification_records",
    "load_pretrained",
    "logits_of",
    "sequence_classifier_client",
]

#: Label of a position that no loss is computed on (padding), as in transformers.
IGNORE_INDEX = -100


def _require_hf() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"Hugging Face models need the hf extra: pip install 'fedpriv[hf]' ({err})"
        ) from None


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The forward pass a TorchClient runs: keywords in, the output's logits out."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each record's labelled positions.

    ``reduction="none"`` gives one loss per record, as per-record clipping needs;
    ``"mean"`` their mean (each record weighs the same, whatever its length), the
    mean that Opacus scales per-record gradients by. Positions labelled
    :data:`IGNORE_INDEX` count for nothing; a record with none has loss 0.

    Example:
        >>> logits = torch.zeros(2, 4, 5)
        >>> labels = torch.tensor([[1, 2, 3, 4], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
        >>> [round(x, 4) for x in causal_lm_loss(logits, labels, "none").tolist()]
        [1.6094, 1.6094]
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counted = (targets != IGNORE_INDEX).sum(dim=1)
    per_record = per_token.sum(dim=1) / counted.clamp(min=1)
    if reduction == "none":
        return per_record
    if reduction == "sum":
        return per_record.sum()
    if reduction == "mean":
        return per_record.mean()
    raise ValueError(f"reduction = {reduction!r}: expected 'mean', 'sum' or 'none'")


class TokenBlocks(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """A token stream cut into records of `block_size` tokens for language modelling.

    Each record is ``(input_ids, attention_mask, labels)`` with ``labels`` equal
    to ``input_ids`` (the loss shifts them); the tail shorter than a block is
    dropped, so every record has the same length and the same weight.

    Raises:
        ConfigError: The stream is shorter than one block.
    """

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, *, block_size: int) -> None:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if block_size < 2:
            raise ConfigError(f"block_size = {block_size}: at least 2 tokens per record")
        count = ids.numel() // block_size
        if count < 1:
            raise ConfigError(
                f"{ids.numel()} tokens do not fill one block of {block_size}; "
                "give more text or a smaller block_size"
            )
        self.blocks = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self.blocks[index]
        return block, torch.ones_like(block), block.clone()


class DictRecords(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Records given as dicts (a Hugging Face dataset in torch format) as tuples.

    Each item's ``input_ids``, its ``attention_mask`` (all ones when absent) and its
    ``labels`` (or ``label``; for a language model, ``input_ids`` when absent).

    Raises:
        ConfigError: An item has no ``input_ids``.
    """

    def __init__(self, dataset: Dataset[Mapping[str, Any]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        if "input_ids" not in item:
            raise ConfigError(f"record {index} has no input_ids (keys: {sorted(item)[:8]})")
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        mask = item.get("attention_mask")
        labels = item.get("labels", item.get("label"))
        return (
            ids,
            torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long),
            ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long),
        )


def as_records(dataset: Dataset[Any]) -> Dataset[Any]:
    """`dataset` as tuple records: dict items go through :class:`DictRecords`.

    Example:
        >>> records = as_records([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
        >>> [t.tolist() for t in records[0]]
        [[5, 6, 7], [1, 1, 1], [5, 6, 7]]
    """
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return dataset
    return DictRecords(dataset) if isinstance(first, Mapping) else dataset


def classification_records(
    tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *, max_length: int
) -> TensorDataset:
    """``(input_ids, attention_mask, label)`` records of `texts`, padded to `max_length`."""
    if len(texts) != len(labels):
        raise ConfigError(f"{len(texts)} texts but {len(labels)} labels")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return TensorDataset(
        encoded["input_ids"], encoded["attention_mask"], torch.as_tensor(labels, dtype=torch.long)
    )


def load_pretrained(
    directory: str | pathlib.Path, *, task: str = "causal-lm", num_labels: int | None = None
) -> tuple[nn.Module, Any]:
    """A model and its tokenizer from a local folder (``save_pretrained``'s layout).

    Nothing is downloaded: the folder must hold the config, the weights
    (safetensors) and the tokenizer's files.

    Args:
        directory: The folder.
        task: ``"causal-lm"`` or ``"sequence-classification"``.
        num_labels: Classes of a sequence classifier (a new head if the checkpoint
            has none).

    Raises:
        ConfigError: The folder is missing or incomplete, or `task` is unknown.
    """
    _require_hf()
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    folder = pathlib.Path(directory)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; expected a save_pretrained() folder")
    options: dict[str, Any] = {"local_files_only": True}
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, **options)
        elif task == "sequence-classification":
            if num_labels is not None:
                options["num_labels"] = num_labels
            model = AutoModelForSequenceClassification.from_pretrained(folder, **options)
        else:
            raise ConfigError(f"task = {task!r}: expected 'causal-lm' or 'sequence-classification'")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except OSError as err:
        raise ConfigError(f"{folder}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    train_head: bool = False,
) -> PeftModel:
    """`model` with LoRA adapters (PEFT): the base frozen, only the adapters train.

    Args:
        model: A transformers model (from :func:`load_pretrained` or a config).
        rank: The adapters' rank r.
        alpha: LoRA's scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapters' input.
        target_modules: Names of the layers to adapt; None: PEFT's default for the
            architecture (GPT-2: ``c_attn``; Llama: ``q_proj``, ``v_proj``).
        train_head: Also train (and exchange) a sequence classifier's head.
    """
    _require_hf()
    from peft import LoraConfig, TaskType, get_peft_model

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    task = TaskType.SEQ_CLS if train_head else TaskType.CAUSAL_LM
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules is not None else None,
        task_type=task,
        # GPT-2 stores its projections transposed (transformers' Conv1D).
        fan_in_fan_out=model_type == "gpt2",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing alias.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config)


class TransformersClient(TorchClient):
    """A TorchClient for a Hugging Face model; a language model also reports perplexity."""

    def __init__(self, model: nn.Module, *, language_model: bool, **options: Any) -> None:
        super().__init__(model, forward=logits_of, **options)
        self.language_model = language_model

    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Validation loss (and accuracy or perplexity) on ``val_loader``."""
        result = super().evaluate(parameters, config=config)
        loss = result.metrics.get("loss")
        if self.language_model and isinstance(loss, float):
            metrics = dict(result.metrics)
            metrics["perplexity"] = math.exp(min(loss, 50.0))
            return EvaluateResult(num_examples=result.num_examples, metrics=metrics)
        return result


def _adamw(learning_rate: float) -> Any:
    return lambda parameters: torch.optim.AdamW(
        [p for p in parameters if p.requires_grad], lr=learning_rate
    )


def causal_lm_client(
    model: nn.Module,
    *,
    train: Dataset[Any],
    val: Dataset[Any] | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    epochs: int = 1,
    privacy: LocalDP | None = None,
    device: torch.device | str | None = None,
    precision: Precision | str = Precision.AUTO,
) -> TransformersClient:
    """A silo client that fine-tunes a causal language model (AdamW on what trains).

    `train` and `val` hold ``(input_ids, attention_mask, labels)`` records, e.g.
    :class:`TokenBlocks`. Evaluation reports ``loss`` and ``perplexity``.
    """
    return _client(model, True, causal_lm_loss, train, val, batch_size, learning_rate, epochs,
                   privacy, device, precision)  # fmt: skip


def sequence_classifier_client(
    model: nn.Module,
    *,
    train: Dataset[Any],
    val: Dataset[Any] | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    epochs: int = 1,
    privacy: LocalDP | None = None,
    device: torch.device | str | None = None,
    precision: Precision | str = Precision.AUTO,
) -> TransformersClient:
    """A silo client that fine-tunes a sequence classifier (AdamW on what trains).

    Records come from :func:`classification_records`. Evaluation reports ``loss``
    and ``accuracy``.
    """
    return _client(model, False, nn.functional.cross_entropy, train, val, batch_size,
                   learning_rate, epochs, privacy, device, precision)  # fmt: skip


def _client(
    model: nn.Module,
    language_model: bool,
    loss_fn: Any,
    train: Dataset[Any],
    val: Dataset[Any] | None,
    batch_size: int,
    learning_rate: float,
    epochs: int,
    privacy: LocalDP | None,
    device: torch.device | str | None,
    precision: Precision | str,
) -> TransformersClient:
    _require_hf()
    return TransformersClient(
        model,
        language_model=language_model,
        train_loader=DataLoader(as_records(train), batch_size=batch_size, shuffle=True),
        val_loader=None if val is None else DataLoader(as_records(val), batch_size=batch_size),
        loss_fn=loss_fn,
        optimizer_factory=_adamw(learning_rate),
        epochs=epochs,
        privacy=privacy,
        device=device,
        precision=precision,
    )
