"""Continuous batching: many requests share one model, joining and leaving the running batch at every step.

The KV cache is a pool of blocks (`mixtral.serve.blocks`), sized by the server's KV memory: a sequence takes
blocks as it grows, so the engine runs as many sequences as the memory holds at their actual lengths (at most
`max_batch`), not a fixed number of rows of `max_seq_len`. A sequence waits in a bounded queue until it is
admitted (beyond `max_queue`, `submit` refuses: the HTTP 429). With prefix caching, an admitted prompt starts
from the longest run of full blocks some earlier sequence computed with the same tokens (a system prompt, a
chat's earlier turns), and the `n` choices of one prompt share a single prefill: the first computes it, the others
take its blocks by reference when it is done.

Each step of the engine thread
1. admits waiting sequences while rows and blocks are left;
2. prefills: one forward over the sequences still prefilling, with at most `prefill_chunk` prompt tokens each, so a
   long prompt is spread over several steps instead of stalling everyone's decoding; a sequence whose prompt is
   done samples its first token (so do the choices that share its prefill) and decodes from the next step;
3. decodes: one forward over all decoding sequences, one token each, every row at its own position, each sampled
   with its own settings and its own seeded generator, so a sequence gets what it would get alone.
The forwards, the sampling and the detokenization are `mixtral.generate`'s steps (`prefill`, `decode_step`,
`sample`, `TextStream`), the same that `mixtral.generate.stream` runs, through the block pool's `BlockBatch`.
When a forward needs more blocks than the pool has left, the most recently admitted sequence is preempted: it
gives its blocks back and returns to the front of the queue, to recompute its prompt and the tokens it generated
(largely from the prefix cache) when memory frees up; its client sees nothing but a pause.
A sequence that finishes (EOS, a stop string, max_tokens) leaves in the step that finished it, one that was
cancelled (its client went away) at the start of the next step. A failure while sampling fails that sequence
only; a failure in a forward fails the sequences of that forward; the engine goes on either way.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mixtral.batch_invariant import batch_invariant
from mixtral.errors import ContextLengthError, InputError
from mixtral.generate import (TextStream, check_sampling, decode_step, prefill, sample, seeded_generator,
                              token_logprobs)
from mixtral.model import Transformer
from mixtral.serve.blocks import BlockBatch, BlockPool, BlockTable
from mixtral.serve.metrics import Histogram, Rate

log = logging.getLogger("mixtral")

FINISH_REASONS = ("stop", "length", "cancelled", "error")
BLOCK_SIZE = 16  # tokens per KV block: small enough that little memory is left unused at a row's end
IDLE_CHECK_S = 0.5  # how often an idle loop asks whether it should go on
# The KV cache when no memory is given: enough for max_batch sequences of max_seq_len tokens, but not more than
# this (64 sequences of 4096 tokens of Mixtral-8x7B in bf16 would be 32 GiB).
DEFAULT_KV_CACHE_CAP = 4 * 2 ** 30

# Buckets of the rows-per-decode-step histogram (up to the largest pool the benchmark runs) and of the time to the
# first token, in seconds.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
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
    grammar: Any = None  # a compiled mixtral.serve.structured.Grammar: sampling follows it


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
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self.text = TextStream(tokenizer, params.stop, context=prompt[-1:] if params.continue_prompt else ())
        self.tokens: list[int] = []
        self.table = BlockTable()  # its blocks in the pool
        # What to prefill: the prompt, or after a preemption the prompt and every token generated so far.
        self.target = prompt
        self.prefilled = 0  # tokens of `target` in the cache
        self.followers: list[Generation] = []  # choices of the same prompt that wait to share this one's prefill
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted_at = time.monotonic()

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.target)

    def group(self) -> list[Generation]:
        return [self] + self.followers


def ungroup(leaders: list[Generation]) -> list[Generation]:
    """The leaders and their followers, each on its own: every follower is detached from its leader (before they
    all end together, so that no follower is promoted in its leader's place)."""
    every = []
    for g in leaders:
        every += g.group()
        g.followers = []
    return every


class Engine:
    """The continuous-batching engine (see the module docstring). `start()` runs it in a thread of its own;
    `submit`, `cancel` and the read-only attributes are safe to use from any other thread."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 64, max_seq_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 256, kv_cache_memory: int | None = None,
                 block_size: int = BLOCK_SIZE, prefix_caching: bool = True, batch_invariant: bool = False):
        """Allocate the KV pool: `kv_cache_memory` bytes of blocks (default: what `max_batch` sequences of
        `max_seq_len` tokens take, at most DEFAULT_KV_CACHE_CAP), for sequences of up to `max_seq_len` tokens (default: the model's context),
        at most `max_batch` of them at once. `batch_invariant`: every forward in `mixtral.batch_invariant`'s
        mode, so a sequence's logits do not depend on the others in its batch, bitwise.

        Raises InputError for a limit below 1, a `max_seq_len` past the model's context, or a memory that cannot
        hold one sequence.
        """
        config = model.config
        max_seq_len = config.context_len if max_seq_len is None else max_seq_len
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk), ("block_size", block_size)):
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        if max_seq_len > config.context_len:
            raise InputError(f"max_seq_len {max_seq_len} exceeds the model's context of {config.context_len} tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.prefill_chunk = min(prefill_chunk, max_seq_len)
        self.prefix_caching = prefix_caching
        self.batch_invariant = batch_invariant
        weight = model.tok_embeddings.weight
        block_bytes = BlockPool.bytes_per_block(config, block_size, weight.dtype)
        if kv_cache_memory is None:
            kv_cache_memory = min(max_batch * -(-max_seq_len // block_size) * block_bytes, DEFAULT_KV_CACHE_CAP)
        n_blocks = kv_cache_memory // block_bytes
        # The most blocks one sequence can hold at once: its whole length, or for a sliding-window model the
        # window, one chunk and the partly used blocks at both ends.
        longest = max_seq_len
        if config.sliding_window is not None:
            longest = min(longest, config.sliding_window + self.prefill_chunk + 2 * block_size)
        self.max_blocks_per_sequence = -(-longest // block_size)
        if n_blocks < self.max_blocks_per_sequence:
            raise InputError(f"a KV cache memory of {kv_cache_memory / 2 ** 20:.1f} MiB holds {n_blocks} blocks of "
                             f"{block_size} tokens ({block_bytes / 2 ** 10:.0f} KiB each); one sequence of "
                             f"max_seq_len={max_seq_len} needs {self.max_blocks_per_sequence}: give more memory "
                             f"or a shorter max_seq_len")
        self.pool = BlockPool(config, n_blocks, block_size, dtype=weight.dtype, device=weight.device)
        self.cache_bytes = self.pool.nbytes
        self.rows: list[Generation] = []  # the running sequences, in the order they were admitted
        self.waiting: deque[Generation] = deque()  # leaders of groups; their followers wait with them
        self._cond = threading.Condition()  # guards `waiting` and `_stopping`; wakes the idle engine
        self._stopping = False
        self._running = False
        self._thread: threading.Thread | None = None
        # What /metrics reads (plain ints and floats: a reader on another thread sees a consistent enough value).
        # counts: prompt_tokens (submitted), prefill_tokens (computed), cached_tokens (taken from the prefix cache
        # or a shared prefill), generation_tokens, steps, preemptions, finished_<reason>, rejected.
        self.counts: Counter[str] = Counter()
        self.kv_tokens = 0  # tokens held in the cache by the running sequences
        self.peak_rows = 0  # the most sequences that ran at once
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
        """The most sequences one request may ask for: all must fit in the queue, and run at once."""
        return min(self.max_batch, self.max_queue)

    def submit(self, requests: list[tuple[list[int], SamplingParams, Callable[[Event], None]]]) -> list[Generation]:
        """Queue the sequences of one request, all or none: (prompt ids, settings, callback) each. Sequences of one
        request with the same prompt (its `n` choices) share one prefill.

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
        leaders: dict[tuple[int, ...], Generation] = {}
        for g in generations:
            leader = leaders.setdefault(tuple(g.prompt), g)
            if leader is not g:
                leader.followers.append(g)
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            queued = sum(len(g.group()) for g in self.waiting)
            if queued + len(generations) > self.max_queue:
                self.counts["rejected"] += len(generations)
                raise QueueFullError(f"the server is busy: {queued} sequences are waiting already "
                                     f"(limit {self.max_queue}); try again shortly")
            self.waiting.extend(leaders.values())
            self.counts["prompt_tokens"] += sum(len(g.prompt) for g in generations)
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
        """Run the engine loop (`run`) in a daemon thread."""
        self._running = True  # from now on, not from whenever the thread gets going
        self._thread = threading.Thread(target=self.run, name="mixtral-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; queued and running sequences end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._running

    def warm_up(self) -> None:
        """Generate two tokens on this thread before `start`: builds the kernels and touches the pool's memory, so
        the first client does not pay for it, and shows the model runs at all."""
        self.submit([([self.tokenizer.bos_id], SamplingParams(max_tokens=2, temperature=0.0), lambda event: None)])
        with torch.inference_mode():
            while self.waiting or self.rows:
                self.step()
        self.pool.clear()
        self.pool.evictions = 0
        self.counts.clear()
        self.peak_rows = 0
        self.token_rate, self.batch_sizes, self.ttft = Rate(), Histogram(BATCH_BUCKETS), Histogram(TTFT_BUCKETS)

    # ---- the engine thread ---------------------------------------------------------------------------------------

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The engine loop, on this thread: step while there is work, wait while there is none, until `stop()` or
        until `keep_going()` turns False (asked at least every IDLE_CHECK_S). Whatever is left then ends as
        cancelled, also when the loop ends by an exception (KeyboardInterrupt).

        `mixtral serve` runs it on the main thread, the one that loaded the model, and the HTTP server in another:
        with OpenMP's thread pools, the first thread to run torch's parallel kernels keeps spinning workers that
        pick up the next kernel at once, while a second thread's pool is throttled (more OpenMP threads than cores),
        and its small kernels take 2-4x as long to start (measured: a one-row 256x688 product, 17 us against 66).
        """
        self._running = True
        try:
            with torch.inference_mode():
                while keep_going():
                    with self._cond:
                        if not self._stopping and not self.waiting and not self.rows:
                            self._cond.wait(IDLE_CHECK_S)
                        if self._stopping:
                            break
                        if not self.waiting and not self.rows:
                            continue
                    try:
                        self.step()
                    except Exception as e:  # a bug of ours, not a request's: fail what runs, keep serving the rest
                        log.exception("engine step failed")
                        self._reset_pool(f"internal error in the engine: {e}")
        finally:
            self._running = False
            with self._cond:
                self._stopping = True  # nothing is admitted any more
                left, self.waiting = list(self.waiting), deque()
            for generation in ungroup(left + self.rows):
                self._finish(generation, "cancelled")

    def step(self) -> None:
        """One step: drop cancelled sequences, admit waiting ones, prefill, decode (see the module docstring)."""
        self._drop_cancelled()
        self._admit()
        if any(not g.decoding for g in self.rows):
            self._prefill()
        if any(g.decoding for g in self.rows):
            self._decode()
        self.counts["steps"] += 1
        self.kv_tokens = sum(g.table.length for g in self.rows)

    def _drop_cancelled(self) -> None:
        with self._cond:
            groups = list(self.waiting)
        cancelled = [g for g in self.rows if g.cancelled]
        for leader in groups + self.rows:
            cancelled += [f for f in leader.followers if f.cancelled]
            leader.followers = [f for f in leader.followers if not f.cancelled]
        with self._cond:
            for leader in [g for g in self.waiting if g.cancelled]:
                self._promote(leader, front=False)
                cancelled.append(leader)
        for g in cancelled:
            self._finish(g, "cancelled")

    def _promote(self, leader: Generation, front: bool) -> None:
        """`leader` leaves its queue place or its row before its prefill is done: its first follower takes its
        place in the queue (with `front`: at the head, to start over), leading the others. Needs the lock."""
        if leader in self.waiting:
            index = self.waiting.index(leader)
            del self.waiting[index]
        else:
            index = 0 if front else len(self.waiting)
        if leader.followers:
            heir, heir.followers = leader.followers[0], leader.followers[1:]
            leader.followers = []
            self.waiting.insert(index, heir)

    def _admit(self) -> None:
        """Admit waiting groups in order while rows and blocks are left: a group needs rows for all its choices,
        and blocks for its uncached prompt beside those the prefilling sequences will take and one for each running
        sequence's next step."""
        while True:
            with self._cond:
                if not self.waiting:
                    return
                g = self.waiting[0]
                if len(self.rows) + len(g.group()) > self.max_batch:
                    return
                if self.prefix_caching:
                    self.pool.match(g.table, g.target)
                # Its own prompt, what the prompts admitted before it still have to take, and a block for each
                # running sequence's next token: admitting more would only lead to preemptions.
                need = (self.pool.blocks_for(len(g.target)) - len(g.table.blocks) + len(self.rows)
                        + sum(self.pool.blocks_for(len(r.target)) - len(r.table.blocks)
                              for r in self.rows if not r.decoding))
                if self.rows and need > self.pool.available:
                    self.pool.release(g.table)  # not now: the blocks it matched stay cached
                    return
                self.waiting.popleft()
            g.prefilled = g.table.length
            self.counts["cached_tokens"] += g.prefilled
            self.rows.append(g)
            self.peak_rows = max(self.peak_rows, len(self.rows) + len(g.followers))

    def _make_room(self, batch: list[Generation], n_new: list[int]) -> tuple[list[Generation], list[int]]:
        """Preempt the most recently admitted sequences until the pool has the blocks that feeding `n_new[i]`
        tokens to `batch[i]` takes; what is left of the batch and its counts."""
        while True:
            need = sum(self.pool.needed(g.table, n) for g, n in zip(batch, n_new))
            if need <= self.pool.available:
                return batch, n_new
            victim = self.rows[-1]
            self._preempt(victim)
            keep = [i for i, g in enumerate(batch) if g is not victim]
            batch, n_new = [batch[i] for i in keep], [n_new[i] for i in keep]

    def _preempt(self, g: Generation) -> None:
        """Send `g` back to the head of the queue, without its blocks: it will prefill its prompt and everything it
        generated again (what the prefix cache still holds of it, for free)."""
        self.rows.remove(g)
        self.pool.release(g.table)
        g.target = g.prompt + g.tokens
        g.prefilled = 0
        self.counts["preemptions"] += 1
        log.info("preempted a sequence of %d tokens: the KV cache is full", len(g.target))
        with self._cond:
            self.waiting.appendleft(g)

    def _prefill(self) -> None:
        batch = [g for g in self.rows if not g.decoding]
        counts = [min(self.prefill_chunk, len(g.target) - g.prefilled) for g in batch]
        batch, counts = self._make_room(batch, counts)
        if not batch:
            return
        chunk = max(counts)
        ids = torch.zeros(len(batch), chunk, dtype=torch.long)
        for i, (g, n) in enumerate(zip(batch, counts)):
            ids[i, :n] = torch.tensor(g.target[g.prefilled: g.prefilled + n])
        logits = self._forward(prefill, batch, ids, counts)
        if logits is None:
            return
        self.counts["prefill_tokens"] += sum(counts)
        for g, n, row_logits in zip(batch, counts, logits):
            g.prefilled += n
            self._register(g)
            if not g.decoding:
                continue
            group = [g]
            for f in g.followers:  # the other choices of this prompt: its blocks, its logits, their own samples
                f.table, f.prefilled = self.pool.fork(g.table), len(f.target)
                self.counts["cached_tokens"] += len(f.target)
                self.rows.append(f)
                group.append(f)
            g.followers = []
            for member in group:
                self._add_token(member, row_logits)

    def _decode(self) -> None:
        batch = [g for g in self.rows if g.decoding]
        batch, _ = self._make_room(batch, [1] * len(batch))
        if not batch:
            return
        self.batch_sizes.observe(len(batch))
        logits = self._forward(decode_step, batch, [g.tokens[-1] for g in batch])
        if logits is None:
            return
        for g, row_logits in zip(batch, logits):
            self._register(g)
            self._add_token(g, row_logits)

    def _register(self, g: Generation) -> None:
        """Name the blocks `g` has filled, for later prompts to find."""
        if self.prefix_caching and len(g.table.names) < g.table.length // self.pool.block_size:
            self.pool.register(g.table, g.prompt + g.tokens)

    def _forward(self, run: Callable[..., torch.Tensor], batch: list[Generation], *args) -> torch.Tensor | None:
        """`run(model, cache, *args)` (`prefill` or `decode_step`) over the sequences of `batch`: the logits
        [rows, vocab], on the CPU; None after a failure, which fails `batch`."""
        try:
            cache = BlockBatch(self.pool, [g.table for g in batch], self.max_seq_len)
            with self._mode():
                logits = run(self.model, cache, *args)
        except Exception as e:
            log.exception("model forward failed for %d sequences", len(batch))
            self._fail(ungroup(batch), f"the model failed on this batch: {e}")
            return None
        return logits.cpu()

    def _mode(self):
        return batch_invariant() if self.batch_invariant else contextlib.nullcontext()

    def _add_token(self, g: Generation, logits: torch.Tensor) -> None:
        """Sample the next token of `g` from its `logits` [vocab], hand out the event, and let `g` go when done."""
        try:
            p = g.params
            allowed = logits
            if g.matcher is not None:
                allowed = logits.clone()
                g.matcher.mask_(allowed)
            token = sample(allowed, p.temperature, p.top_k, p.top_p, g.generator)
            if g.matcher is not None:
                g.matcher.accept(token)
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
        """End `g` with an event that carries only the reason, and free its blocks if it has some."""
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
        if g in self.rows:
            self.rows.remove(g)
            if g.followers:  # it leaves before its prefill is done: a follower starts over, leading the rest
                with self._cond:
                    self._promote(g, front=True)
            self.pool.release(g.table)

    def _reset_pool(self, message: str) -> None:
        """Fail every running sequence and empty the pool: the way out of a step that failed half-way, whatever
        state it left the sequences and the pool in."""
        running, self.rows = ungroup(self.rows), []
        self.pool.clear()
        for g in running:
            g.table = BlockTable()
            self._finish(g, "error", message)
