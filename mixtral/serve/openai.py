"""OpenAI's response shapes: the engine's events of one request turned into a completion or chat completion,
whole or streamed as server-sent events.

`CompletionFormat` and `ChatFormat` say how a choice, a streamed delta and the logprobs look for each endpoint;
`Reply` collects the events of a request's sequences and answers with one of them.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request

from mixtral.serve.engine import Engine, Event, Generation
from mixtral.serve.schemas import APIError, error_body

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


class TokenTexts:
    """The text of single tokens, for logprobs: decoded after an anchor token, since sentencepiece drops the
    leading space of the first piece it decodes (" Paris" would come out as "Paris")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", bos=False)
        self.anchor_text = tokenizer.decode(self.anchor)
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode(self.anchor + [token])[len(self.anchor_text):]
        return self._texts[token]


class CompletionFormat:
    """The JSON of /v1/completions: choices with "text", logprobs in the legacy shape."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    continues_prompt = True  # prompt + text is the whole text (OpenAI's completions)

    def __init__(self, texts: TokenTexts):
        self.texts = texts

    def logprobs(self, events: list[Event], offset: int) -> dict:
        tokens = [self.texts(e.token) for e in events]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        top = [None if e.top_logprobs is None else {self.texts(t): lp for t, lp in e.top_logprobs} for e in events]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": top if any(t is not None for t in top) else None, "text_offset": offsets}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool) -> dict:
        return self.choice(index, text or "", logprobs, finish_reason)


class ChatFormat(CompletionFormat):
    """The JSON of /v1/chat/completions: a "message" (or "delta" when streaming), logprobs per content token."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    continues_prompt = False  # the reply stands alone: no leading space after [/INST]

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, events: list[Event], offset: int) -> dict:
        return {"content": [{**self._entry(e.token, e.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs or ()]}
                            for e in events]}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason for the engine's: OpenAI knows "stop" and "length"; a cancelled sequence has no
    reader, and an error is reported on its own."""
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict | str) -> str:
    """One server-sent event carrying `data` (JSON, or a string such as [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """The events of one request's sequences, turned into OpenAI's response (`whole`) or chunks (`stream`).

    `queue` receives (choice index, event) for every sequence of `generations` (choice i is generations[i]).
    """

    def __init__(self, engine: Engine, fmt: CompletionFormat, model: str, generations: list[Generation],
                 queue: asyncio.Queue, prompt_tokens: int):
        self.engine, self.fmt, self.model, self.generations, self.queue = engine, fmt, model, generations, queue
        self.id = fmt.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def _wrap(self, choices: list[dict], chunk: bool) -> dict:
        return {"id": self.id, "object": self.fmt.chunk_object if chunk else self.fmt.object,
                "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self, request: Request | None = None) -> AsyncIterator[list[tuple[int, Event]]]:
        """Lists of (choice index, event), as many as have arrived, until every sequence has finished; stops early
        if `request`'s client has gone. Taking what is there at once lets a stream write several tokens in one
        go when it falls behind, instead of waking up once per token."""
        left, checked = len(self.generations), time.monotonic()
        while left:
            if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:
                # The first event: straight from the queue when one is there (no timer to set up per token).
                batch = [self.queue.get_nowait() if not self.queue.empty()
                         else await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)]
            except asyncio.TimeoutError:
                continue
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for _, event in batch:
                if event.token is not None:
                    self.completion_tokens += 1
                if event.finish_reason is not None:
                    left -= 1
            yield batch

    def cancel(self) -> None:
        """Let go of the sequences still running (the client has gone, or the reply was cut short)."""
        for g in self.generations:
            self.engine.cancel(g)

    async def whole(self, request: Request) -> dict:
        """The whole response, once every sequence has finished. Raises APIError (500) if one failed."""
        n = len(self.generations)
        pieces: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[Event]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        try:
            async for batch in self.events(request):
                for i, event in batch:
                    pieces[i].append(event.text)
                    if event.token is not None:
                        tokens[i].append(event)
                    if event.finish_reason == "error":
                        raise APIError(500, f"generation failed: {event.error}", type="server_error")
                    if event.finish_reason is not None:
                        finish[i] = finish_reason(event.finish_reason)
        finally:
            self.cancel()
        choices = []
        for i in range(n):
            logprobs = (self.fmt.logprobs(tokens[i], 0)
                        if self.generations[i].params.logprobs is not None else None)
            choices.append(self.fmt.choice(i, "".join(pieces[i]), logprobs, finish[i]))
        return {**self._wrap(choices, chunk=False), "usage": self.usage()}

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the last of each choice with its finish_reason, the usage
        if asked for, then [DONE]. A sequence that fails gets an error event."""
        first = [True] * len(self.generations)
        offsets = [0] * len(self.generations)
        try:
            async for batch in self.events():
                out = []  # the events of every token that has arrived, written in one go
                for i, event in batch:
                    if event.finish_reason == "error":
                        out.append(sse(error_body(f"generation failed: {event.error}", type="server_error")))
                        continue
                    wants_logprobs = self.generations[i].params.logprobs is not None and event.token is not None
                    if not (event.text or wants_logprobs or event.finish_reason or first[i]):
                        continue  # a token whose text is held back (a partial character, a possible stop string)
                    logprobs = self.fmt.logprobs([event], offsets[i]) if wants_logprobs else None
                    offsets[i] += len(event.text)
                    reason = None if event.finish_reason is None else finish_reason(event.finish_reason)
                    text = event.text if event.text or event.finish_reason is None else None
                    out.append(sse(self._wrap([self.fmt.delta(i, text, logprobs, reason, first[i])], chunk=True)))
                    first[i] = False
                if out:
                    yield "".join(out)
            if include_usage:
                yield sse({**self._wrap([], chunk=True), "usage": self.usage()})
            yield sse("[DONE]")
        finally:
            self.cancel()
