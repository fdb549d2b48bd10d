"""The OpenAI-compatible HTTP API over the engine: the FastAPI app, its request schemas and OpenAI's error shape.

    GET  /v1/models, /v1/models/{id}   the one model this server runs
    POST /v1/completions               prompt(s) -> text; "stream": true sends server-sent events ending in [DONE]
    POST /v1/chat/completions          messages in the Mixtral Instruct format (mistral-common) -> the reply
    GET  /health                       200 while the engine thread runs, 503 if it has stopped
    GET  /metrics                      Prometheus text format

Every error answers `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API does, with a 4xx status for
anything the client sent: the strict schemas below (no type coercion, unknown fields refused), then the engine's
own checks (context length, vocabulary), 429 with Retry-After when the engine's queue is full, 413 for a body over
the limit. A 5xx means a bug of ours, and fails that request only.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixtral.errors import ContextLengthError, MixtralError
from mixtral.io.tokenizer import CHAT_ROLES
from mixtral.serve import metrics
from mixtral.serve.engine import FINISH_REASONS, Engine, Event, Generation, QueueFullError, SamplingParams

MAX_N = 16  # choices per request at most (also capped by the engine's pool and queue)
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 5  # alternatives per token in /v1/completions (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # ... and in /v1/chat/completions (OpenAI's limit)
DEFAULT_MAX_BODY = 1 << 20  # bytes; a full 32k-token prompt as text or ids is ~0.25 MB
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a step or a few, when rows free up
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


# ---- request schemas -------------------------------------------------------------------------------------------

class Strict(BaseModel):
    # strict: "5" is not an int, true is not a number; forbid: a misspelt parameter is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class SamplingRequest(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy (argmax)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="not in OpenAI's API (vLLM's extension): sample among the k "
                                                      "most likely tokens")
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1,
                             description="the same seed gives the same output, alone or batched with others")
    stop: Stop = Field(None, description="end the text before the first of these strings")
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate (choice i is seeded with seed + i)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="not in OpenAI's API (vLLM's extension): go on past the end-of-"
                                                "sequence token up to max_tokens (for benchmarks)")
    user: str | None = Field(None, description="accepted and ignored")


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1, description="null: as many as fit in the context")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = Field(None, description="accepted and ignored (the Instruct format has no names)")


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="null: as many as fit in the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens; wins")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "invalid request"), (404, "unknown model"), (413, "request body too large"),
                         (429, "the queue is full: retry after Retry-After seconds"))}


# ---- errors ----------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*|literal\[.*|constrained-.*|[A-Z].*)$")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors on a request body: the first few, named by their field path."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON{': ' + detail if detail else ''}", None
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # missing, or not an object
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    parts, params = [], []
    for e in errors[:5]:
        # Union members add their type to the path ("prompt.list[int]"); keep the field names and indices only.
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
        param = ".".join(loc) or None
        params.append(param)
        parts.append(f"{param}: {e.get('msg')}" if param else str(e.get("msg")))
    if not errors:
        return "invalid request", None
    return "; ".join(parts), params[0]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal server error: {type(e).__name__}", type="server_error")


# ---- ASGI middleware -------------------------------------------------------------------------------------------

class BodyLimit:
    """Reads the whole request body before the app sees it and answers 413 once it passes `limit` bytes (at once
    when Content-Length says so), so no handler ever holds an oversized body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(413, f"the request body exceeds this server's limit of {self.limit} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


class CountRequests:
    """Counts responses by route and status code for /metrics (unknown paths count as "other")."""

    def __init__(self, app, counts: Counter, paths: set[str]):
        self.app, self.counts, self.paths = app, counts, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[(path, str(message["status"]))] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


# ---- responses -------------------------------------------------------------------------------------------------

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


def _finish_reason(reason: str) -> str:
    # OpenAI knows "stop" and "length"; a cancelled sequence has no reader, an error is reported on its own.
    return reason if reason in ("stop", "length") else "stop"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the app ---------------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_name: str, *, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine` (started separately) under the model name `model_name`."""
    tokenizer = engine.tokenizer
    texts = TokenTexts(tokenizer)
    created = int(time.time())
    http_counts: Counter = Counter()
    app = FastAPI(title="mixtral", summary="OpenAI-compatible API for Mixtral of Experts, continuously batched",
                  version="1")
    _install_error_handlers(app)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mixtral",
                "max_model_len": engine.max_seq_len}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server runs {model_name!r}",
                           param="model", code="model_not_found")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", responses={404: ERROR_RESPONSES[404]})
    async def retrieve_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(_render_metrics(engine, http_counts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        return await generate(request, body, prompts, body.max_tokens, body.logprobs, CompletionFormat(texts),
                              "prompt")

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in body.messages]
        try:
            prompt = tokenizer.encode_chat(messages)
        except MixtralError as e:
            raise APIError(400, str(e), param="messages") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await generate(request, body, [prompt], max_tokens, logprobs, ChatFormat(texts), "messages")

    async def generate(request: Request, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                       logprobs: int | None, fmt: CompletionFormat, prompt_param: str):
        """Submit every prompt × n choices to the engine, then answer with the whole result or a stream."""
        if not engine.is_alive():
            raise APIError(503, "the engine has stopped; see the server's log", type="server_error")
        limit = min(MAX_N, engine.max_sequences)
        if len(prompts) * body.n > limit:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} sequences; this "
                                f"server's limit is {limit} per request", param="n" if body.n > 1 else prompt_param)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        jobs = []
        for ids in prompts:
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % 2 ** 64
                params = SamplingParams(
                    max_tokens=max_tokens if max_tokens is not None else max(1, engine.max_seq_len - len(ids)),
                    temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed, stop=stop,
                    logprobs=logprobs, ignore_eos=body.ignore_eos, continue_prompt=fmt.continues_prompt)
                index = len(jobs)
                jobs.append((ids, params, lambda event, i=index: loop.call_soon_threadsafe(queue.put_nowait,
                                                                                            (i, event))))
        try:
            generations = engine.submit(jobs)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ContextLengthError as e:
            long_prompt = any(len(ids) >= engine.max_seq_len for ids in prompts)
            raise APIError(400, str(e), param=prompt_param if long_prompt else "max_tokens",
                           code="context_length_exceeded") from None
        except MixtralError as e:  # the schema checked the settings: what is left is about the prompt (vocabulary)
            raise APIError(400, str(e), param=prompt_param) from None
        reply = Reply(engine, fmt, model_name, generations, queue, sum(map(len, prompts)))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await reply.whole(request)

    paths = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, counts=http_counts, paths=paths)
    return app


class Reply:
    """The events of one request's sequences, turned into OpenAI's response (`whole`) or chunks (`stream`)."""

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

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence has finished; stops early if `request`'s client has gone."""
        left, checked = len(self.generations), time.monotonic()
        while left:
            if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if event.token is not None:
                self.completion_tokens += 1
            if event.finish_reason is not None:
                left -= 1
            yield index, event

    def cancel(self) -> None:
        """Let go of the sequences still running (the client has gone, or the reply was cut short)."""
        for g in self.generations:
            self.engine.cancel(g)

    async def whole(self, request: Request) -> dict:
        n = len(self.generations)
        pieces: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[Event]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        try:
            async for i, event in self.events(request):
                pieces[i].append(event.text)
                if event.token is not None:
                    tokens[i].append(event)
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", type="server_error")
                if event.finish_reason is not None:
                    finish[i] = _finish_reason(event.finish_reason)
        finally:
            self.cancel()
        choices = []
        for i in range(n):
            logprobs = (self.fmt.logprobs(tokens[i], 0)
                        if self.generations[i].params.logprobs is not None else None)
            choices.append(self.fmt.choice(i, "".join(pieces[i]), logprobs, finish[i]))
        return {**self._wrap(choices, chunk=False), "usage": self.usage()}

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        first = [True] * len(self.generations)
        offsets = [0] * len(self.generations)
        try:
            async for i, event in self.events():
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                          "param": None, "code": None}})
                    continue
                wants_logprobs = self.generations[i].params.logprobs is not None and event.token is not None
                if not (event.text or wants_logprobs or event.finish_reason or first[i]):
                    continue  # a token whose text is held back (a partial character, a possible stop string)
                logprobs = self.fmt.logprobs([event], offsets[i]) if wants_logprobs else None
                offsets[i] += len(event.text)
                reason = None if event.finish_reason is None else _finish_reason(event.finish_reason)
                text = event.text if event.text or event.finish_reason is None else None
                yield _sse(self._wrap([self.fmt.delta(i, text, logprobs, reason, first[i])], chunk=True))
                first[i] = False
            if include_usage:
                yield _sse({**self._wrap([], chunk=True), "usage": self.usage()})
            yield _sse("[DONE]")
        finally:
            self.cancel()


def _render_metrics(engine: Engine, http_counts: Counter) -> str:
    counts = engine.counts
    capacity = engine.max_batch * engine.max_seq_len
    return metrics.render([
        ("mixtral_http_requests_total", "counter", "HTTP responses by route and status code",
         [({"route": path, "status": status}, n) for (path, status), n in sorted(http_counts.items())]),
        ("mixtral_sequences_finished_total", "counter",
         "sequences that left the engine, by reason (stop, length, cancelled: the client went away, error)",
         [({"reason": r}, counts[f"finished_{r}"]) for r in FINISH_REASONS]),
        ("mixtral_sequences_rejected_total", "counter", "sequences refused with 429 because the queue was full",
         [({}, counts["rejected"])]),
        ("mixtral_prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, counts["prompt_tokens"])]),
        ("mixtral_generation_tokens_total", "counter", "tokens generated", [({}, counts["generation_tokens"])]),
        ("mixtral_generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
         [({}, engine.token_rate.per_second())]),
        ("mixtral_engine_steps_total", "counter", "engine steps (each: admit, prefill, decode)",
         [({}, counts["steps"])]),
        ("mixtral_queue_depth", "gauge", "sequences waiting for a row of the KV pool", [({}, len(engine.waiting))]),
        ("mixtral_queue_limit", "gauge", "waiting sequences beyond which requests get 429", [({}, engine.max_queue)]),
        ("mixtral_running_sequences", "gauge", "sequences holding a row (decoding or prefilling): the batch size",
         [({}, len(engine.rows))]),
        ("mixtral_batch_rows", "gauge", "rows of the KV pool: the largest batch", [({}, engine.max_batch)]),
        ("mixtral_decode_batch_size", "histogram", "rows in each decode step", engine.batch_sizes),
        ("mixtral_time_to_first_token_seconds", "histogram", "from a sequence's submission to its first token",
         engine.ttft),
        ("mixtral_kv_cache_tokens", "gauge", "tokens held in the KV pool by running sequences",
         [({}, engine.kv_tokens)]),
        ("mixtral_kv_cache_capacity_tokens", "gauge", "tokens the KV pool holds (rows x max sequence length)",
         [({}, capacity)]),
        ("mixtral_kv_cache_usage_ratio", "gauge", "kv_cache_tokens / kv_cache_capacity_tokens",
         [({}, engine.kv_tokens / capacity)]),
        ("mixtral_kv_cache_bytes", "gauge", "memory of the KV pool, allocated at start", [({}, engine.cache_bytes)]),
    ])
