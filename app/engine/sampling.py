"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus).

Each request has its own :class:`SamplingParams` and, when seeded, its own
``torch.Generator``, so a seeded request gives the same tokens whatever else
shares its batch. Top-p is Holtzman et al. 2019 (arXiv:1904.09751). This module
does not know about adapters, batching or stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    Attributes:
        max_tokens: most new tokens to generate.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: keep the smallest set of tokens whose probability sums to >= top_p (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        seed: seeds this request's own generator, for reproducible sampling.
        stop: strings that end the completion (not included in the output).
        ignore_eos: keep generating past end-of-sequence tokens (benchmarks).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device``, or ``None`` when unseeded."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p filtering of one row of logits.

    Args:
        logits: ``[vocab]`` float logits.

    Returns:
        ``[vocab]`` float32 logits with filtered-out tokens at ``-inf``.
    """
    x = logits.float() / max(temperature, 1e-5)
    if top_k > 0 and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token is always kept)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    return x


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick the next token of every row.

    Args:
        logits: ``[rows, vocab]`` last-position logits.
        params: one :class:`SamplingParams` per row.
        generators: one generator per row (``None``: the global RNG).

    Returns:
        one token id per row.
    """
    greedy = torch.argmax(logits, dim=-1).tolist()
    out: list[int] = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(int(greedy[i]))
            continue
        probs = torch.softmax(filter_logits(logits[i], p.temperature, p.top_k, p.top_p), dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out
