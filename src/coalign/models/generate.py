"""Caption generation with a model's caption decoder: greedy, beam search and top-p sampling, batched.

Every caption starts with the tokenizer's start token and ends at its stop token (`Specials.bos`,
`Specials.eos`, whatever ids a loaded tokenizer gives them), or at `max_length` tokens, start and
stop included (at most the text tower's context length, the longest caption it has positions for).
The padding token, the start token and every other special token but the stop token are never
generated. The image tokens are encoded and pooled once per image; each step runs the causal text
tower and the decoder over the prefix (a caption is tens of tokens, so no key-value cache).

A caption's score is the sum of the log-probabilities of its tokens under the model (stop token
included; temperature and the nucleus do not change it), so greedy, beam and sampled captions
compare on one scale. Beam search keeps the `beam` best prefixes of each image by that score; a
prefix that has stopped keeps its slot and its score. There is no length penalty: beam search finds
captions the model finds more likely, and beam width 1 is greedy decoding, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coalign.models.encoders.base import Tokens
from coalign.models.model import MultimodalModel
from coalign.registry import ConfigError


@dataclass(frozen=True)
class Decoding:
    """How to choose each token: greedy (the default), beam search (`beam` > 1) or top-p sampling."""

    beam: int = 1
    top_p: float | None = None  # sample from the smallest set of tokens whose probability reaches p
    temperature: float = 1.0  # of the sampling distribution (top-p only)
    max_length: int | None = None  # tokens, start and stop included; None: the text tower's context
    seed: int = 0  # of the sampling

    def __post_init__(self):
        if self.beam < 1:
            raise ConfigError(f"beam must be at least 1, got {self.beam}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_p is not None and self.beam > 1:
            raise ConfigError("choose beam search or top-p sampling, not both")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (start and one token), got {self.max_length}")


@dataclass
class Generated:
    tokens: list[list[int]]  # per image, the generated ids without start, stop and padding
    scores: torch.Tensor  # (B,) float: the sum of the log-probabilities of each caption's tokens
    stopped: torch.Tensor  # (B,) bool: the caption ended with the stop token (not at max_length)


class Captioner:
    """The decoding state shared by the three methods: the model's text tower and decoder, the
    tokenizer's start, stop and padding ids, and the ids never generated."""

    def __init__(
        self, model: MultimodalModel, start: int | None, stop: int | None, pad: int, specials: list[int]
    ):
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            raise ConfigError(
                "this model has no caption decoder (train a recipe with model.decoder, e.g. coca)"
            )
        if start is None:
            raise ConfigError("the tokenizer has no start token, so a caption cannot be begun")
        self.model, self.decoder = model, decoder
        self.tower = model.towers[decoder.text]
        self.start, self.stop, self.pad = start, stop, pad
        self.context_length = int(getattr(self.tower.cfg, "context_length", 0) or 0) or None
        blocked = torch.zeros(decoder.vocab_size, dtype=torch.bool)
        blocked[[i for i in {pad, start, *specials} if i != stop and 0 <= i < decoder.vocab_size]] = True
        self.blocked = blocked

    @classmethod
    def of(cls, model: MultimodalModel, transform) -> Captioner:
        """For a model and its text transform: the tokenizer's own start, stop and padding ids."""
        sp = transform.specials
        return cls(model, sp.bos, sp.eos, sp.pad, transform.special_ids())

    def texts(self, transform, generated: Generated) -> list[str]:
        return [transform.decode(t) for t in generated.tokens]

    def length(self, decoding: Decoding) -> int:
        L = decoding.max_length or self.context_length
        if L is None:
            raise ConfigError("give max_length: the text tower does not say how many positions it has")
        if self.context_length is not None and self.context_length < L:
            raise ConfigError(
                f"max_length {L} exceeds the text tower's context length {self.context_length} "
                f"(its positions); use at most {self.context_length}"
            )
        return L

    @torch.no_grad()
    def memory(self, images: torch.Tensor) -> torch.Tensor:
        """(B, n, D) the decoder's pooled image tokens, once per image."""
        context = self.model.towers[self.decoder.context](images)
        return self.decoder.pool_context(context)

    @torch.no_grad()
    def next_logprobs(self, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """(R, V) float log-probabilities of the token after each prefix (R, t); never-generated ids -inf."""
        text: Tokens = self.tower(ids)
        logits = self.decoder.logits(text, memory)[:, -1]  # (R, V)
        logits = logits.masked_fill(self.blocked.to(logits.device), float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    def finish(self, ids: torch.Tensor, scores: torch.Tensor) -> Generated:
        tokens, stopped = [], []
        for row in ids[:, 1:].tolist():
            end = row.index(self.stop) if self.stop is not None and self.stop in row else None
            stopped.append(end is not None)
            kept = row if end is None else row[:end]
            tokens.append([t for t in kept if t != self.pad] if end is None else kept)
        return Generated(tokens, scores.float().cpu(), torch.tensor(stopped))

    def generate(self, images: torch.Tensor, decoding: Decoding | None = None) -> Generated:
        decoding = decoding or Decoding()
        L = self.length(decoding)
        memory = self.memory(images)
        if decoding.top_p is not None:
            return self.sample(memory, L, decoding)
        if decoding.beam > 1:
            return self.beam_search(memory, L, decoding.beam)
        return self.greedy(memory, L)

    def _stopped(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.stop is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return tokens == self.stop

    def greedy(self, memory: torch.Tensor, L: int) -> Generated:
        B = memory.shape[0]
        ids = torch.full((B, 1), self.start, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        scores = torch.zeros(B, device=memory.device)
        for _ in range(L - 1):
            logp = self.next_logprobs(ids, memory)  # (B, V)
            best, token = logp.max(-1)
            scores = scores + torch.where(done, 0.0, best)
            token = torch.where(done, self.pad, token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done = done | self._stopped(token)
            if bool(done.all()):
                break
        return self.finish(ids, scores)

    def beam_search(self, memory: torch.Tensor, L: int, K: int) -> Generated:
        B, device = memory.shape[0], memory.device
        memory = memory.repeat_interleave(K, dim=0)  # (B * K, n, D)
        ids = torch.full((B * K, 1), self.start, dtype=torch.long, device=device)
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live prefix at first: K copies of <bos> would fill the beam with one caption
        done = torch.zeros(B, K, dtype=torch.bool, device=device)
        V = self.decoder.vocab_size
        # a stopped prefix continues with padding only, at no cost (its score stays what it was)
        after_stop = torch.full((V,), float("-inf"), device=device)
        after_stop[self.pad] = 0.0
        for _ in range(L - 1):
            logp = self.next_logprobs(ids, memory).view(B, K, V)
            logp = torch.where(done[..., None], after_stop, logp)
            top, index = (scores[..., None] + logp).view(B, K * V).topk(K, dim=-1)  # (B, K)
            beam, token = index // V, index % V
            rows = (beam + torch.arange(B, device=device)[:, None] * K).view(-1)  # (B * K,) rows of ids
            ids = torch.cat([ids[rows], token.view(-1, 1)], dim=1)
            done = done.gather(1, beam) | self._stopped(token)
            scores = top
            if bool(done.all()):
                break
        best = scores.argmax(dim=1)  # (B,)
        rows = best + torch.arange(B, device=device) * K
        return self.finish(ids[rows], scores[torch.arange(B, device=device), best])

    def sample(self, memory: torch.Tensor, L: int, decoding: Decoding) -> Generated:
        B, device = memory.shape[0], memory.device
        generator = torch.Generator(device=device).manual_seed(decoding.seed)
        ids = torch.full((B, 1), self.start, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        scores = torch.zeros(B, device=device)
        for _ in range(L - 1):
            logp = self.next_logprobs(ids, memory)  # (B, V)
            probs = torch.softmax(logp / decoding.temperature, dim=-1)
            token = top_p_draw(probs, decoding.top_p, generator)  # (B,)
            scores = scores + torch.where(done, 0.0, logp.gather(1, token[:, None]).squeeze(1))
            token = torch.where(done, self.pad, token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done = done | self._stopped(token)
            if bool(done.all()):
                break
        return self.finish(ids, scores)


def nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """(R, V) bool: the smallest set of most probable tokens whose probability reaches p (Holtzman
    et al. 2020), per row; the most probable token always."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens ranked above each
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def top_p_draw(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(R,) one token per row, drawn from `probs` (R, V) renormalised over its nucleus."""
    kept = probs * nucleus(probs, p)
    return torch.multinomial(kept / kept.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
