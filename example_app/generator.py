"""A tiny character-level text generator, built in code with fixed seeded weights (nonsense text).

``build_generator()`` is the factory of the example app's ``"generator"`` model. Its ``forward`` takes a
prompt as character codes (``encode``) and *yields* one character at a time, so the app streams it with
``model.stream(...)`` (see ``POST /generate`` in :mod:`example_app.app`)::

    prompt codes --GRU over the prompt--> state --(step, sample next char) x max_new_tokens--> "a", "b", ...

The weights are untrained, so the text is gibberish, but deterministic: every worker builds the same
model, and sampling is seeded from the prompt, so the same prompt always gives the same text.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

#: The characters the model reads and writes; anything else in a prompt reads as a space.
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?'"
SEED = 0


def encode(text: str) -> torch.Tensor:
    """The codes of *text* (lowercased; unknown characters become spaces), an int64 tensor."""
    space = ALPHABET.index(" ")
    return torch.tensor([ALPHABET.find(c) if c in ALPHABET else space for c in text.lower()],
                        dtype=torch.int64)


class CharGRU(nn.Module):
    """Embedding, one GRU layer and a linear head over :data:`ALPHABET`."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET), 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(ALPHABET))

    def forward(self, prompt: torch.Tensor, max_new_tokens: int = 64) -> Iterator[str]:
        """Yield *max_new_tokens* characters following *prompt*, sampled with a generator seeded from
        the prompt."""
        codes = prompt.reshape(1, -1) if prompt.numel() else torch.tensor([[ALPHABET.index(" ")]])
        sampler = torch.Generator().manual_seed(SEED + sum((i + 1) * int(c) for i, c in enumerate(codes[0])))
        out, state = self.gru(self.embed(codes))
        logits = self.head(out[:, -1])
        for _ in range(max_new_tokens):
            code = int(torch.multinomial(logits.softmax(dim=-1), 1, generator=sampler))
            yield ALPHABET[code]
            out, state = self.gru(self.embed(torch.tensor([[code]])), state)
            logits = self.head(out[:, -1])


def build_generator() -> CharGRU:
    """The example generator with fixed weights (seeded from :data:`SEED`)."""
    generator = torch.Generator().manual_seed(SEED)
    model = CharGRU()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()
