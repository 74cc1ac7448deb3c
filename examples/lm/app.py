"""A small character-level transformer, pretrained on public text and fine-tuned across silos.

- Public text, for pretraining: the docstrings of Python's standard library
  (they ship with every Python, so nothing is downloaded).
- Each silo's private text: a share of this repository's own Markdown files
  (README, docs/, the examples' READMEs), split by file. The last 10% of every
  file is the silo's held-out text.

Perplexity is per character: exp of the mean cross-entropy on held-out text.
"""

from __future__ import annotations

import ast
import math
import pathlib
import sysconfig
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpriv._types import Scalar
from fedpriv.client.torch import TorchClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTEXT = 64
VOCAB = 97  # newline, the 95 printable ASCII characters, and one for everything else
SEED = 11
# Standard-library modules whose docstrings make the public corpus (fixed, so the
# pretraining data is the same on every machine with the same Python).
PUBLIC_MODULES = (
    "argparse", "asyncio/base_events", "calendar", "collections/__init__", "configparser",
    "csv", "datetime", "decimal", "difflib", "email/message", "fractions", "ftplib",
    "functools", "gettext", "http/client", "imaplib", "inspect", "ipaddress", "json/decoder",
    "logging/__init__", "mailbox", "pathlib", "pickle", "pydoc", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest/case", "urllib/parse", "zipfile",
)  # fmt: skip


def encode(text: str) -> torch.Tensor:
    """Characters to token ids."""
    ids = [0 if c == "\n" else (ord(c) - 31 if 32 <= ord(c) < 127 else VOCAB - 1) for c in text]
    return torch.tensor(ids, dtype=torch.long)


class TinyGPT(nn.Module):
    """Token and position embeddings, causal transformer blocks, a tied output layer."""

    def __init__(self, *, width: int = 96, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(CONTEXT, width)
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer(
            "causal", torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), 1), persistent=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, VOCAB)."""
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        x = self.blocks(x, mask=self.causal[:length, :length], is_causal=True)
        return self.norm(x) @ self.tokens.weight.T


def make_model() -> nn.Module:
    """The untrained network (the coordinator starts from the pretrained checkpoint)."""
    torch.manual_seed(SEED)
    return TinyGPT()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy."""
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


class Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(input, next-character target) windows of CONTEXT characters, `stride` apart."""

    def __init__(self, ids: torch.Tensor, *, stride: int) -> None:
        self.ids = ids
        self.starts = range(0, max(len(ids) - CONTEXT - 1, 0) + 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[k]
        return self.ids[start : start + CONTEXT], self.ids[start + 1 : start + CONTEXT + 1]


def public_text() -> str:
    """Docstrings of the modules in PUBLIC_MODULES, one after another."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in PUBLIC_MODULES:
        tree = ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    return "\n\n".join(parts)


def silo_files(index: int, num_silos: int) -> list[pathlib.Path]:
    """Silo `index`'s Markdown files: every `num_silos`-th, largest first."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").glob("*/README.md"))
    files.sort(key=lambda p: (-p.stat().st_size, str(p)))
    return files[index::num_silos]


# Each silo's text is capped, so that the run takes the same time however much
# Markdown the repository holds; the held-out text is cut in proportion.
MAX_SILO_CHARS = 24_000


def silo_text(index: int, num_silos: int) -> tuple[str, str]:
    """Silo `index`'s (training text, held-out text), at most MAX_SILO_CHARS of training text."""
    train, held_out = [], []
    for path in silo_files(index, num_silos):
        text = path.read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        train.append(text[:cut])
        held_out.append(text[cut:])
    return "\n\n".join(train)[:MAX_SILO_CHARS], "\n\n".join(held_out)[: MAX_SILO_CHARS // 9]


def pretrain(*, steps: int, batch_size: int = 32, lr: float = 3e-3) -> tuple[nn.Module, float]:
    """Train on the public text; return the model and its final training loss."""
    torch.manual_seed(SEED)
    model = make_model()
    data = Windows(encode(public_text()), stride=CONTEXT // 2)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    done, loss_value = 0, math.nan
    while done < steps:
        for inputs, targets in loader:
            loss = lm_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            done += 1
            if done == steps:
                break
    return model, loss_value


def make_client(config: Mapping[str, Scalar]) -> TorchClient:
    """Silo `config['silo_index']` of `config['num_silos']`, fine-tuning on its own text."""
    index = int(config.get("silo_index", 0))
    num_silos = int(config.get("num_silos", 3))
    train, held_out = silo_text(index, num_silos)
    lr = float(config.get("lr", 1e-3))
    generator = torch.Generator().manual_seed(SEED + index)
    return TorchClient(
        make_model(),
        train_loader=DataLoader(
            Windows(encode(train), stride=CONTEXT // 4),
            batch_size=32,
            shuffle=True,
            generator=generator,
        ),
        val_loader=DataLoader(Windows(encode(held_out), stride=CONTEXT), batch_size=64),
        loss_fn=lm_loss,
        optimizer_factory=lambda params: torch.optim.AdamW(params, lr=lr),
        epochs=int(config.get("epochs", 1)),
    )
