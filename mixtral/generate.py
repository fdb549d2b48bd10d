"""Generation: chunked prefill, then one decode step at a time through the KV cache.

The steps are small public functions, run by `stream` here and by the serving engine (`mixtral.serve.engine`)
alike: `prefill` feeds one chunk of prompt tokens to each row of a cache, `decode_step` one token to each row;
`sample` draws one row's next token with that row's own generator (`seeded_generator`), `token_logprobs` reports
its log-probability; `TextStream` turns a row's tokens into text piece by piece, holding back what could still
become a stop string.

`generate` works on token ids (the public contract); `stream_text` and `complete` sit on top of it for strings,
streaming and stop strings. Prompts of different lengths share a batch without changing each other's result:
every row runs at its own positions (see `mixtral.cache`), and sampling uses one random generator per row, so a
row seeded with s draws what it would draw alone with seed s.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator, Sequence

import torch

from mixtral.batch_invariant import batch_invariant as batch_invariant_mode
from mixtral.cache import KVCache
from mixtral.errors import ContextLengthError, InputError
from mixtral.model import Transformer


# ---- the steps -------------------------------------------------------------------------------------------------

def prefill(model: Transformer, cache: KVCache, ids: torch.Tensor,
            n_new: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Feed one chunk of tokens to every row of `cache`: `ids` [rows, chunk], of which the first `n_new[r]` of row
    r are real (default: all) and the rest padding.

    Returns the float32 logits [rows, vocab] of each row's last real token (meaningless for a row given none).
    Raises ContextLengthError when a row would outgrow the cache.
    """
    device = model.tok_embeddings.weight.device
    n_new = None if n_new is None else torch.as_tensor(n_new, device=device)
    return model(ids.to(device), cache=cache, n_new=n_new, last_only=True)[:, 0].float()


def decode_step(model: Transformer, cache: KVCache, tokens: Sequence[int | None],
                active: Sequence[bool] | None = None) -> torch.Tensor:
    """Feed `tokens[r]` to row r of `cache`, for the rows that are `active` (default: all; the token of an inactive
    row, None allowed, is not fed). Returns the float32 logits [rows, vocab] of each active row's next token."""
    ids = torch.tensor([[t if t is not None else 0] for t in tokens])
    n_new = None if active is None else [1 if a else 0 for a in active]
    return prefill(model, cache, ids, n_new)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one row's sampling, seeded with `seed` (None: from fresh entropy)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return generator


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token id from the logits [vocab] of one row. temperature 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    # Sample on the CPU: the per-row generators live there, and one row of logits is small. In float64, shifted by
    # the maximum: every value is <= 0, so any positive temperature (1e-300 is one) gives -inf, i.e. probability 0,
    # never inf - inf = NaN, and the temperature itself does not round to 0 as it would in float32.
    logits = logits.double().cpu()
    logits = (logits - logits.max()) / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p. The first token always stays, also for a top_p
        # that rounds to 0 in float32.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]] | None]:
    """The log-probability of `token` under the logits [vocab] of one row (the model's own distribution, before
    temperature, top-k and top-p), and the `top` most likely tokens with theirs, best first (None when top is 0)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives = None
    if top:
        best = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logprobs[token]), alternatives


def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int) -> None:
    """Raise InputError for a sampling setting `sample` cannot use, or a negative `max_new_tokens`."""
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


# ---- generation ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def stream(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
           eos_id: int | None = 2, prefill_chunk: int = 512,
           batch_invariant: bool = False) -> Iterator[list[int | None]]:
    """Yield, at each decode step, the new token of every row (None once a row has finished).

    A row finishes after `max_new_tokens` tokens or after producing `eos_id` (which is yielded).
    batch_invariant: run the forwards in the batch-invariant mode (`mixtral.batch_invariant`): each row's logits,
    hence its greedy tokens, bitwise those it gets alone, at a cost (docs/serving.md). False leaves the mode as the
    calling thread has it.
    Raises InputError for empty prompts, ids outside the vocabulary or bad sampling settings, and
    ContextLengthError when a prompt plus `max_new_tokens` does not fit the model's context.
    """
    config = model.config
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    batch = len(prompts)
    if batch == 0 or max_new_tokens == 0:
        return
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty: it needs at least one token (the BOS token)")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        if len(p) + max_new_tokens > config.context_len:
            raise ContextLengthError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                                     f"exceeds the model's context of {config.context_len} tokens")
    seeds = [seed] * batch if seed is None or isinstance(seed, int) else list(seed)
    generators = [seeded_generator(s) for s in seeds]

    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    chunk = min(prefill_chunk, longest)
    # A rolling (sliding-window) cache has window + max_chunk - 1 slots and keeps position p in slot p % slots; in
    # the batch-invariant mode the slots follow prefill_chunk rather than this batch's longest prompt, so that a
    # row's keys lie in the order they have when it runs alone.
    cache = KVCache(config, batch, longest + max_new_tokens, max_chunk=prefill_chunk if batch_invariant else chunk,
                    dtype=model.tok_embeddings.weight.dtype, device=device)
    # Entered around each forward, never held across a `yield`: the caller's code between tokens runs on this
    # thread too and must not find the mode on.
    mode = batch_invariant_mode if batch_invariant else nullcontext
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)

    # Prefill in chunks; keep the logits of each row's last prompt token.
    last_logits = torch.empty(batch, config.vocab_size, device=device)
    for start in range(0, longest, chunk):
        n_new = (lengths - start).clamp(0, chunk)
        with mode():
            logits = prefill(model, cache, ids[:, start:start + chunk], n_new)
        ends_here = (lengths > start) & (lengths <= start + chunk)
        last_logits[ends_here] = logits[ends_here]

    finished = [False] * batch
    for step in range(max_new_tokens):
        tokens: list[int | None] = []
        for i in range(batch):
            if finished[i]:
                tokens.append(None)
                continue
            token = sample(last_logits[i], temperature, top_k, top_p, generators[i])
            tokens.append(token)
            if token == eos_id or step + 1 == max_new_tokens:
                finished[i] = True
        yield tokens
        if all(finished):
            return
        with mode():
            last_logits = decode_step(model, cache, tokens, active=[not f for f in finished])


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             **kwargs) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists); keyword arguments as in `stream`."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream(model, prompts, max_new_tokens, temperature=temperature, **kwargs):
        for row, token in zip(out, tokens):
            if token is not None:
                row.append(token)
    return out


# ---- text and stop strings -------------------------------------------------------------------------------------

def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def stop_at(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was found): cut at the first stop string, and hold back any tail
    that could still grow into one."""
    cut = find_stop(text, stops)
    if cut >= 0:
        return text[:cut], True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], False


class TextStream:
    """One sequence's tokens in, its text out piece by piece: what `stream_text` yields and the server streams.

    Text is held back while it ends in an unfinished character (`Tokenizer.stream`) or in what could still grow
    into one of the `stop` strings, so no piece is ever taken back. Once a stop string appears the text ends
    before it and `stopped` turns True. `context`: tokens the text continues, decoded but not part of it (a
    completion's prompt ends in them, so its first piece keeps its leading space).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.stop = tuple(stop)
        self.decoder = tokenizer.stream()
        for token in context:
            self.decoder.push(token)
        self.text = ""  # everything decoded so far; text[:emitted] has been handed out
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show ("" while held back)."""
        self.text += self.decoder.push(token)
        return self._take(final=False)

    def finish(self, token: int | None = None) -> str:
        """End the text, after one last `token` if given; return what is left to show: what was held back is
        final text now, unless it completed a stop string."""
        if token is not None:
            self.text += self.decoder.push(token)
        self.text += self.decoder.flush()
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        safe, self.stopped = stop_at(self.text, self.stop)
        if final and not self.stopped:
            safe = self.text
        piece = safe[self.emitted:]
        self.emitted = max(self.emitted, len(safe))
        return piece


def stream_text(model: Transformer, tokenizer, prompt: str | Sequence[int], max_new_tokens: int, *,
                stop: Sequence[str] = (), **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt as text, piece by piece, ending before any of the `stop` strings.

    `prompt` is a string (encoded with BOS) or token ids; keyword arguments as in `stream`.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = TextStream(tokenizer, stop)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    for (token,) in stream(model, [ids], max_new_tokens, **kwargs):
        if token == kwargs["eos_id"]:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def complete(model: Transformer, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, *,
             stop: Sequence[str] = (), **kwargs) -> list[str]:
    """The text continuations of a batch of prompts (strings, encoded with BOS, or token ids), each cut before the
    first stop string."""
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    outputs = generate(model, ids, max_new_tokens, **kwargs)
    texts = []
    for ids in outputs:
        if ids and ids[-1] == kwargs["eos_id"]:
            ids = ids[:-1]
        # Decoded whole, not through a TextStream: nothing is shown before the end, so nothing is held back.
        text = tokenizer.decode(ids)
        cut = find_stop(text, stop)
        texts.append(text[:cut] if cut >= 0 else text)
    return texts
