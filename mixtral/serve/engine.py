"""Continuous batching: many requests share one model, joining and leaving the running batch at every step.

The KV cache is a pool of `max_batch` rows of `max_seq_len` slots: one `mixtral.cache.KVCache`, allocated once,
whose size is the server's KV memory limit. Each sequence of a request takes a free row; while none is free it
waits in a bounded queue (beyond `max_queue`, `submit` refuses: the HTTP 429). Rows in use stay packed at the
front of the pool, decoding rows first, then rows still prefilling, so that every forward runs on a contiguous
slice of the cache (a view, no copy) and never computes a free row:

    rows  [ decoding ... | prefilling ... | free ... ]
           0             d                n          max_batch

Each step of the engine thread
1. admits waiting sequences into free rows (at n);
2. prefills: one forward over the prefilling rows with at most `prefill_chunk` prompt tokens each, so a long prompt
   is spread over several steps instead of stalling everyone's decoding; a row whose prompt is done samples its
   first token and joins the decoding rows;
3. decodes: one forward over all decoding rows, one token each, every row at its own position (the cache's
   per-slot positions, as `mixtral.generate` batches prompts of different lengths), each sampled with its own
   settings and its own seeded generator, so a sequence gets what it would get alone.
The forwards, the sampling and the detokenization are `mixtral.generate`'s steps (`prefill`, `decode_step`,
`sample`, `TextStream`), the same that `mixtral.generate.stream` runs; the rows move through the cache's row
operations (`KVCache.rows`, `move_rows`, `clear_rows`).
A sequence that finishes (EOS, a stop string, max_tokens) leaves in the step that finished it, one that was
cancelled (its client went away) at the start of the next step: the last row of its region moves into its place.
A failure while sampling fails that sequence only; a failure in a forward fails the sequences of that forward;
the engine goes on either way.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import torch

from mixtral.cache import KVCache
from mixtral.errors import ContextLengthError, InputError
from mixtral.generate import (TextStream, check_sampling, decode_step, prefill, sample, seeded_generator,
                              token_logprobs)
from mixtral.model import Transformer
from mixtral.serve.metrics import Histogram, Rate

log = logging.getLogger("mixtral")

FINISH_REASONS = ("stop", "length", "cancelled", "error")

# Buckets of the rows-per-decode-step histogram (up to the largest pool the benchmark runs) and of the time to the
# first token, in seconds.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueFullError(Exception):
    """The waiting queue has no room for a request's sequences: the server is busy, try again later (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated: `mixtral.generate.sample`'s settings, a seed, stop strings, logprobs."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # report each token's log-probability and this many alternatives; None: don't
    ignore_eos: bool = False  # generate max_tokens tokens whatever comes (benchmarks)
    # Decode the text as what follows the prompt's last token, so a completion of "Paris is" starts " the": the
    # prompt and the text join up. Off, the text is decoded on its own (a chat reply: no leading space).
    continue_prompt: bool = False


@dataclass
class Event:
    """What one sequence produced in one step, handed to its `on_event` callback on the engine's thread."""
    text: str = ""  # new text, cut before any stop string; "" while text is held back
    token: int | None = None  # the token sampled in this step; None in an event that only ends the sequence
    logprob: float | None = None  # its log-probability under the model's distribution (before temperature)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities
    finish_reason: str | None = None  # on the last event: one of FINISH_REASONS
    error: str | None = None  # with finish_reason "error": what went wrong


class Generation:
    """One sequence being generated: its prompt, settings, tokens so far and text, and where it stands."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None], tokenizer):
        self.prompt = prompt
        self.params = params
        self.on_event = on_event
        self.generator = seeded_generator(params.seed)
        self.text = TextStream(tokenizer, params.stop, context=prompt[-1:] if params.continue_prompt else ())
        self.tokens: list[int] = []
        self.prefilled = 0  # prompt tokens already in the cache
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted_at = time.monotonic()


class Engine:
    """The continuous-batching engine (see the module docstring). `start()` runs it in a thread of its own;
    `submit`, `cancel` and the read-only attributes are safe to use from any other thread."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 64, max_seq_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 256):
        """Allocate the KV pool: `max_batch` rows of `max_seq_len` tokens (default: the model's context).

        Raises InputError for a limit below 1 or a `max_seq_len` past the model's context.
        """
        config = model.config
        max_seq_len = config.context_len if max_seq_len is None else max_seq_len
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        if max_seq_len > config.context_len:
            raise InputError(f"max_seq_len {max_seq_len} exceeds the model's context of {config.context_len} tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.prefill_chunk = min(prefill_chunk, max_seq_len)
        weight = model.tok_embeddings.weight
        self.cache = KVCache(config, max_batch, max_seq_len, max_chunk=self.prefill_chunk, dtype=weight.dtype,
                             device=weight.device)
        self.cache_bytes = self.cache.nbytes
        self.rows: list[Generation] = []  # rows[i] lives in row i of the cache
        self.decoding = 0  # rows[:decoding] decode, rows[decoding:] prefill
        self.waiting: deque[Generation] = deque()
        self._cond = threading.Condition()  # guards `waiting` and `_stopping`; wakes the idle engine
        self._stopping = False
        self._thread: threading.Thread | None = None
        # What /metrics reads (plain ints and floats: a reader on another thread sees a consistent enough value).
        self.counts: Counter[str] = Counter()  # prompt_tokens, generation_tokens, steps, finished_<reason>, rejected
        self.kv_tokens = 0  # tokens held in the cache by the running sequences
        self.token_rate = Rate()
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)

    # ---- the interface for other threads -------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InputError or ContextLengthError if this sequence could never run here."""
        check_sampling(params.temperature, params.top_k, params.top_p, params.max_tokens)
        if params.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if params.logprobs is not None and params.logprobs < 0:
            raise InputError(f"logprobs must be >= 0, got {params.logprobs}")
        if not prompt:
            raise InputError("the prompt is empty: it needs at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InputError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; this server's context is "
                                     f"{self.max_seq_len} tokens, prompt and completion together")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ContextLengthError(f"max_tokens={params.max_tokens} with a prompt of {len(prompt)} tokens exceeds "
                                     f"this server's context of {self.max_seq_len} tokens (at most "
                                     f"{self.max_seq_len - len(prompt)} new tokens fit)")

    @property
    def max_sequences(self) -> int:
        """The most sequences one request may ask for: all must fit in the queue, and in the pool at once."""
        return min(self.max_batch, self.max_queue)

    def submit(self, requests: list[tuple[list[int], SamplingParams, Callable[[Event], None]]]) -> list[Generation]:
        """Queue the sequences of one request, all or none: (prompt ids, settings, callback) each.

        The callback receives every Event of its sequence on the engine's thread, and must return quickly.
        Raises InputError/ContextLengthError for a sequence that could never run (too many sequences, a bad
        setting, a prompt past the context), QueueFullError when the queue has no room for all of them now.
        """
        if len(requests) > self.max_sequences:
            raise InputError(f"{len(requests)} sequences in one request exceed this server's limit of "
                             f"{self.max_sequences}")
        for prompt, params, _ in requests:
            self.check(prompt, params)
        generations = [Generation(list(p), params, on_event, self.tokenizer) for p, params, on_event in requests]
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self.waiting) + len(generations) > self.max_queue:
                self.counts["rejected"] += len(generations)
                raise QueueFullError(f"the server is busy: {len(self.waiting)} sequences are waiting already "
                                     f"(limit {self.max_queue}); try again shortly")
            self.waiting.extend(generations)
            self._cond.notify()
        return generations

    def cancel(self, generation: Generation) -> None:
        """Stop `generation` (its client went away): the engine drops it at its next step, from the queue or from
        its row. A sequence that has finished is left alone."""
        if generation.finish_reason is None:
            generation.cancelled = True
            with self._cond:
                self._cond.notify()

    def start(self) -> None:
        """Run the engine loop in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="mixtral-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; queued and running sequences end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def warm_up(self) -> None:
        """Generate two tokens on this thread before `start`: builds the kernels and touches the pool's memory, so
        the first client does not pay for it, and shows the model runs at all."""
        self.submit([([self.tokenizer.bos_id], SamplingParams(max_tokens=2, temperature=0.0), lambda event: None)])
        with torch.inference_mode():
            while self.waiting or self.rows:
                self.step()
        self.counts.clear()
        self.token_rate, self.batch_sizes, self.ttft = Rate(), Histogram(BATCH_BUCKETS), Histogram(TTFT_BUCKETS)

    # ---- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception as e:  # a bug of ours, not a request's: fail what runs, keep serving the rest
                    log.exception("engine step failed")
                    self._reset_pool(f"internal error in the engine: {e}")
        with self._cond:
            left, self.waiting = list(self.waiting), deque()
        for generation in left + list(self.rows):
            self._finish(generation, "cancelled")

    def step(self) -> None:
        """One step: drop cancelled sequences, admit waiting ones, prefill, decode (see the module docstring)."""
        with self._cond:
            cancelled = [g for g in self.waiting if g.cancelled]
            if cancelled:
                self.waiting = deque(g for g in self.waiting if not g.cancelled)
        for generation in cancelled + [g for g in self.rows if g.cancelled]:
            self._finish(generation, "cancelled")
        with self._cond:
            while self.waiting and len(self.rows) < self.max_batch:
                self.cache.clear_rows([len(self.rows)])
                self.rows.append(self.waiting.popleft())
        if len(self.rows) > self.decoding:
            self._prefill()
        if self.decoding:
            self._decode()
        self.counts["steps"] += 1
        self.kv_tokens = self.cache.rows(0, len(self.rows)).kv_tokens

    def _prefill(self) -> None:
        start, stop = self.decoding, len(self.rows)
        batch = self.rows[start:stop]
        chunk = min(self.prefill_chunk, max(len(g.prompt) - g.prefilled for g in batch))
        ids = torch.zeros(len(batch), chunk, dtype=torch.long)
        n_new = []
        for i, g in enumerate(batch):
            part = g.prompt[g.prefilled: g.prefilled + chunk]
            ids[i, : len(part)] = torch.tensor(part)
            n_new.append(len(part))
        logits = self._forward(prefill, start, stop, batch, ids, n_new)
        if logits is None:
            return
        done = []
        for g, n, row_logits in zip(batch, n_new, logits):
            g.prefilled += n
            if g.prefilled == len(g.prompt):
                done.append((g, row_logits))
        self.counts["prompt_tokens"] += sum(n_new)
        for g, row_logits in done:
            i = self.rows.index(g)
            if i != self.decoding:  # join the decoding rows: swap places with the first prefilling row
                self._move_rows([i, self.decoding], [self.decoding, i])
            self.decoding += 1
            self._add_token(g, row_logits)

    def _decode(self) -> None:
        batch = self.rows[: self.decoding]
        self.batch_sizes.observe(len(batch))
        logits = self._forward(decode_step, 0, len(batch), batch, [g.tokens[-1] for g in batch])
        if logits is None:
            return
        for g, row_logits in zip(batch, logits):
            self._add_token(g, row_logits)

    def _forward(self, run: Callable[..., torch.Tensor], start: int, stop: int, batch: list[Generation],
                 *args) -> torch.Tensor | None:
        """`run(model, cache, *args)` (`prefill` or `decode_step`) on rows start:stop of the pool, whose sequences
        are `batch`: the logits [rows, vocab], on the CPU; None after a failure, which fails `batch`."""
        try:
            logits = run(self.model, self.cache.rows(start, stop), *args)
        except Exception as e:
            log.exception("model forward failed for %d sequences", len(batch))
            self._fail(batch, f"the model failed on this batch: {e}")
            return None
        return logits.cpu()

    def _add_token(self, g: Generation, logits: torch.Tensor) -> None:
        """Sample the next token of `g` from its `logits` [vocab], hand out the event, and let `g` go when done."""
        try:
            p = g.params
            token = sample(logits, p.temperature, p.top_k, p.top_p, g.generator)
            event = Event(token=token)
            if p.logprobs is not None:
                event.logprob, event.top_logprobs = token_logprobs(logits, token, p.logprobs)
            g.tokens.append(token)
            now = time.monotonic()
            if len(g.tokens) == 1:
                self.ttft.observe(now - g.submitted_at)
            self.counts["generation_tokens"] += 1
            self.token_rate.add(1, now)
            eos = token == self.tokenizer.eos_id and not p.ignore_eos
            ends = eos or len(g.tokens) == p.max_tokens
            if ends:  # the EOS token has no text
                event.text = g.text.finish(None if eos else token)
            else:
                event.text = g.text.push(token)
            if g.text.stopped or ends:
                event.finish_reason = "stop" if g.text.stopped or eos else "length"
        except Exception as e:
            log.exception("sampling failed with %s", g.params)
            self._fail([g], f"sampling failed: {e}")
            return
        self._emit(g, event)
        if event.finish_reason is not None:
            self._release(g, event.finish_reason)

    def _emit(self, g: Generation, event: Event) -> None:
        try:
            g.on_event(event)
        except Exception:  # the receiver is gone (its event loop closed): drop the sequence at the next step
            g.cancelled = True

    def _finish(self, g: Generation, reason: str, error: str | None = None) -> None:
        """End `g` with an event that carries only the reason, and free its row if it has one."""
        if g.finish_reason is not None:
            return
        self._emit(g, Event(finish_reason=reason, error=error))
        self._release(g, reason)

    def _fail(self, batch: list[Generation], message: str) -> None:
        for g in batch:
            self._finish(g, "error", message)

    def _release(self, g: Generation, reason: str) -> None:
        g.finish_reason = reason
        self.counts[f"finished_{reason}"] += 1
        if g not in self.rows:
            return
        i, last = self.rows.index(g), len(self.rows) - 1
        if i < self.decoding:
            # The last decoding row fills the hole, and the last prefilling row the place that frees.
            d_last = self.decoding - 1
            self._move_rows([d_last], [i])
            self._move_rows([last], [d_last])
            self.decoding -= 1
        else:
            self._move_rows([last], [i])
        self.rows.pop()
        self.cache.clear_rows([last])

    # ---- rows of the pool ----------------------------------------------------------------------------------------

    def _reset_pool(self, message: str) -> None:
        """Fail every running sequence and empty the pool without moving rows: the way out of a step that failed
        half-way, whatever state it left the rows in."""
        running, self.rows, self.decoding = self.rows, [], 0
        self.cache.reset()
        for g in running:
            self._finish(g, "error", message)

    def _move_rows(self, src: list[int], dst: list[int]) -> None:
        """Move rows `src` of the pool (cache and bookkeeping) to `dst`; [i, j] -> [j, i] swaps them."""
        self.cache.move_rows(src, dst)
        moved = [self.rows[i] for i in src]
        for i, g in zip(dst, moved):
            self.rows[i] = g
