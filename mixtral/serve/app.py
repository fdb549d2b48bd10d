"""The OpenAI-compatible HTTP app over the engine: its routes, error handlers and two ASGI middlewares.

    GET  /v1/models, /v1/models/{id}   the one model this server runs
    POST /v1/completions               prompt(s) -> text; "stream": true sends server-sent events ending in [DONE]
    POST /v1/chat/completions          messages in the Mixtral Instruct format (mistral-common) -> the reply
    GET  /health                       200 while the engine thread runs, 503 if it has stopped
    GET  /metrics                      Prometheus text format

Every error answers `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API does, with a 4xx status for
anything the client sent: the strict schemas of `mixtral.serve.schemas` (no type coercion, unknown fields
refused), then the engine's own checks (context length, vocabulary), 429 with Retry-After when the engine's queue
is full, 413 for a body over the limit. A 5xx means a bug of ours, and fails that request only.
The request schemas live in `mixtral.serve.schemas`, the response shapes in `mixtral.serve.openai`.
"""
from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixtral.errors import ContextLengthError, MixtralError
from mixtral.serve import metrics
from mixtral.serve.engine import FINISH_REASONS, Engine, Event, QueueFullError, SamplingParams
from mixtral.serve.openai import ChatFormat, CompletionFormat, Reply, TokenTexts
from mixtral.serve.schemas import (ERROR_RESPONSES, MAX_N, APIError, ChatCompletionRequest, CompletionRequest,
                                   SamplingRequest, error_body)
from mixtral.serve.structured import Grammar, compile_response_format

DEFAULT_MAX_BODY = 1 << 20  # bytes; a full 32k-token prompt as text or ids is ~0.25 MB
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a step or a few, when rows free up


@dataclass
class Served:
    """What the routes serve (the app's `state.served`): `engine` under the name `model_name`."""
    engine: Engine
    model_name: str
    texts: TokenTexts
    created: int = field(default_factory=lambda: int(time.time()))
    http_counts: Counter = field(default_factory=Counter)  # responses by (route, status), for /metrics

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mixtral",
                "max_model_len": self.engine.max_seq_len}

    def check_model(self, name: str) -> None:
        """Raise APIError (404) unless `name` is the model served."""
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server runs {self.model_name!r}",
                           param="model", code="model_not_found")


def create_app(engine: Engine, model_name: str, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               api_keys: Sequence[str] = ()) -> FastAPI:
    """The ASGI app serving `engine` (started separately) under the model name `model_name`. With `api_keys`,
    every request but GET /health needs `Authorization: Bearer KEY` with one of them (`RequireKey`)."""
    app = FastAPI(title="mixtral", summary="OpenAI-compatible API for Mixtral of Experts, continuously batched",
                  version="1")
    app.state.served = served = Served(engine, model_name, TokenTexts(engine.tokenizer))
    for error, handler in ((APIError, api_error), (RequestValidationError, validation_error),
                           (StarletteHTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(error, handler)
    for method, path, endpoint, options in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], **options)
    paths = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_keys:  # before the body is read, after the request is counted
        app.add_middleware(RequireKey, keys=api_keys)
    app.add_middleware(CountRequests, counts=served.http_counts, paths=paths)
    return app


# ---- routes ----------------------------------------------------------------------------------------------------

def _served(request: Request) -> Served:
    return request.app.state.served


async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_served(request).model_card()]}


async def retrieve_model(model_id: str, request: Request) -> dict:
    served = _served(request)
    served.check_model(model_id)
    return served.model_card()


async def health(request: Request) -> JSONResponse:
    alive = _served(request).engine.is_alive()
    return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)


async def prometheus(request: Request) -> PlainTextResponse:
    served = _served(request)
    return PlainTextResponse(render_metrics(served.engine, served.http_counts),
                             media_type="text/plain; version=0.0.4")


async def completions(body: CompletionRequest, request: Request):
    served = _served(request)
    served.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    tokenizer = served.engine.tokenizer
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    return await run_request(request, body, prompts, body.max_tokens, body.logprobs,
                             CompletionFormat(served.texts), "prompt")


async def chat_completions(body: ChatCompletionRequest, request: Request):
    served = _served(request)
    served.check_model(body.model)
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in body.messages]
    try:
        prompt = served.engine.tokenizer.encode_chat(messages)
    except MixtralError as e:
        raise APIError(400, str(e), param="messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await run_request(request, body, [prompt], max_tokens, logprobs, ChatFormat(served.texts), "messages")


ROUTES = [  # (method, path, handler, options of FastAPI.add_api_route)
    ("GET", "/v1/models", list_models, {}),
    ("GET", "/v1/models/{model_id}", retrieve_model, {"responses": {404: ERROR_RESPONSES[404]}}),
    ("GET", "/health", health, {}),
    ("GET", "/metrics", prometheus, {"response_class": PlainTextResponse}),
    ("POST", "/v1/completions", completions, {"responses": ERROR_RESPONSES}),
    ("POST", "/v1/chat/completions", chat_completions, {"responses": ERROR_RESPONSES}),
]


async def run_request(request: Request, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                      logprobs: int | None, fmt: CompletionFormat, prompt_param: str):
    """Submit every prompt × n choices to the engine, then answer with the whole result or a stream.

    `max_tokens` None: as many as fit in the context; `prompt_param` names the field an error about the prompt
    points at. Raises APIError for what the engine refuses (400, 429) and when it has stopped (503).
    """
    served = _served(request)
    engine = served.engine
    if not engine.is_alive():
        raise APIError(503, "the engine has stopped; see the server's log", type="server_error")
    limit = min(MAX_N, engine.max_sequences)
    if len(prompts) * body.n > limit:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} sequences; this "
                            f"server's limit is {limit} per request", param="n" if body.n > 1 else prompt_param)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    grammar = await compile_grammar(body, engine.tokenizer)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    jobs = []
    for ids in prompts:
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2 ** 64
            params = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else max(1, engine.max_seq_len - len(ids)),
                temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed, stop=stop,
                logprobs=logprobs, ignore_eos=body.ignore_eos, continue_prompt=fmt.continues_prompt,
                grammar=grammar)
            index = len(jobs)
            jobs.append((ids, params, lambda event, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, event))))
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
    reply = Reply(engine, fmt, served.model_name, generations, queue, sum(map(len, prompts)))
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.stream(usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await reply.whole(request)


async def compile_grammar(body: SamplingRequest, tokenizer) -> Grammar | None:
    """The grammar of the request's response_format (None: free text), compiled once for all its sequences.

    Compiled on a worker thread: a large schema takes milliseconds to seconds, which would stall every other
    client on the event loop (a repeated format is a cache hit). Raises APIError (400) naming the problem.
    """
    if body.response_format is None or body.response_format.type == "text":
        return None
    if body.ignore_eos:
        raise APIError(400, "ignore_eos cannot be combined with response_format: the output ends with EOS when "
                            "the document is complete", param="ignore_eos")
    response_format = body.response_format.model_dump(by_alias=True)
    try:
        return await asyncio.to_thread(compile_response_format, response_format, tokenizer)
    except MixtralError as e:
        raise APIError(400, str(e), param="response_format") from None


# ---- errors ----------------------------------------------------------------------------------------------------

def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(e.errors()))
    return error_response(400, message, param=param)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return error_response(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None))


async def server_error(request: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {type(e).__name__}", type="server_error")


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*|literal\[.*|constrained-.*|[A-Z].*)$")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
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


# ---- ASGI middleware -------------------------------------------------------------------------------------------

class RequireKey:
    """Answers 401 in OpenAI's error shape to any request but GET /health (a liveness probe carries no secret)
    without `Authorization: Bearer KEY` for one of `keys`. Each key is compared in constant time, and all of them
    every time, so the time taken says nothing about how close a guess was or which key it resembles; a key is
    never echoed in a response or logged."""

    OPEN = {"/health"}

    def __init__(self, app, keys: Sequence[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            message, code = ("no API key: this server needs one, sent as the header Authorization: Bearer KEY",
                             None)
        else:
            matched = False
            for key in self.keys:
                matched |= hmac.compare_digest(token, key)
            if matched:
                return await self.app(scope, receive, send)
            message, code = "incorrect API key", "invalid_api_key"
        response = error_response(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


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


# ---- metrics ---------------------------------------------------------------------------------------------------

def render_metrics(engine: Engine, http_counts: Counter) -> str:
    """The text of GET /metrics: the engine's counters and gauges, and the HTTP responses by route and status."""
    counts = engine.counts
    pool = engine.pool
    capacity = pool.n_blocks * pool.block_size
    looked_up = counts["cached_tokens"] + counts["prefill_tokens"]
    return metrics.render([
        ("mixtral_http_requests_total", "counter", "HTTP responses by route and status code",
         [({"route": path, "status": status}, n) for (path, status), n in sorted(http_counts.items())]),
        ("mixtral_sequences_finished_total", "counter",
         "sequences that left the engine, by reason (stop, length, cancelled: the client went away, error)",
         [({"reason": r}, counts[f"finished_{r}"]) for r in FINISH_REASONS]),
        ("mixtral_sequences_rejected_total", "counter", "sequences refused with 429 because the queue was full",
         [({}, counts["rejected"])]),
        ("mixtral_prompt_tokens_total", "counter", "prompt tokens submitted", [({}, counts["prompt_tokens"])]),
        ("mixtral_prefill_tokens_total", "counter", "prompt tokens computed (recomputed after a preemption too)",
         [({}, counts["prefill_tokens"])]),
        ("mixtral_prefix_cache_hit_tokens_total", "counter",
         "prompt tokens not computed: found in the prefix cache, or shared by the n choices of one prompt",
         [({}, counts["cached_tokens"])]),
        ("mixtral_prefix_cache_hit_rate", "gauge", "prefix_cache_hit_tokens / (hit + prefill tokens) since start",
         [({}, counts["cached_tokens"] / looked_up if looked_up else 0.0)]),
        ("mixtral_generation_tokens_total", "counter", "tokens generated", [({}, counts["generation_tokens"])]),
        ("mixtral_generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
         [({}, engine.token_rate.per_second())]),
        ("mixtral_engine_steps_total", "counter", "engine steps (each: admit, prefill, decode)",
         [({}, counts["steps"])]),
        ("mixtral_queue_depth", "gauge", "requests waiting to be admitted (their n choices count once)",
         [({}, len(engine.waiting))]),
        ("mixtral_queue_limit", "gauge", "waiting sequences beyond which requests get 429", [({}, engine.max_queue)]),
        ("mixtral_running_sequences", "gauge", "sequences admitted (decoding or prefilling): the batch size",
         [({}, len(engine.rows))]),
        ("mixtral_running_sequences_peak", "gauge", "the most sequences that ran at once since start",
         [({}, engine.peak_rows)]),
        ("mixtral_batch_rows", "gauge", "sequences that may run at once at most (--max-batch)",
         [({}, engine.max_batch)]),
        ("mixtral_preemptions_total", "counter",
         "sequences sent back to the queue because the KV cache was full (they recompute, then go on)",
         [({}, counts["preemptions"])]),
        ("mixtral_decode_batch_size", "histogram", "rows in each decode step", engine.batch_sizes),
        ("mixtral_time_to_first_token_seconds", "histogram", "from a sequence's submission to its first token",
         engine.ttft),
        ("mixtral_kv_cache_tokens", "gauge", "tokens of the running sequences (a shared block counts for each)",
         [({}, engine.kv_tokens)]),
        ("mixtral_kv_cache_capacity_tokens", "gauge", "tokens the KV cache holds (blocks x block size)",
         [({}, capacity)]),
        ("mixtral_kv_cache_blocks", "gauge", "blocks of the KV cache", [({}, pool.n_blocks)]),
        ("mixtral_kv_cache_blocks_used", "gauge", "blocks held by running sequences", [({}, pool.used)]),
        ("mixtral_kv_cache_blocks_cached", "gauge", "blocks nobody holds that keep a prefix for later prompts",
         [({}, len(pool.idle))]),
        ("mixtral_kv_cache_usage_ratio", "gauge", "kv_cache_blocks_used / kv_cache_blocks",
         [({}, pool.used / pool.n_blocks)]),
        ("mixtral_kv_cache_evictions_total", "counter", "cached prefix blocks dropped to make room",
         [({}, pool.evictions)]),
        ("mixtral_kv_cache_bytes", "gauge", "memory of the KV cache (--kv-cache-memory), allocated at start",
         [({}, engine.cache_bytes)]),
        *_offload_metrics(getattr(engine.model, "offload_engine", None)),
    ])


# The offloading engine's counters (`mixtral.offload.Engine.stats`), with --max-memory: name, kind, help, key.
OFFLOAD_METRICS = [
    ("mixtral_offload_experts_needed_total", "counter", "experts the MoE layers used (distinct per layer call)",
     "needed"),
    ("mixtral_offload_hits_total", "counter", "needed experts already in a slot", "hits"),
    ("mixtral_offload_prefetch_hits_total", "counter", "needed experts a prediction had read or was reading",
     "prefetch_hits"),
    ("mixtral_offload_demand_loads_total", "counter", "needed experts read while the layer waited", "demand_loads"),
    ("mixtral_offload_prefetch_loads_total", "counter", "expert reads a prediction started", "prefetch_loads"),
    ("mixtral_offload_loads_in_vain_total", "counter", "prefetched experts evicted or unused by their layer",
     "loads_in_vain"),
    ("mixtral_offload_read_bytes_total", "counter", "bytes read from the expert files", "bytes_read"),
    ("mixtral_offload_stall_seconds_total", "counter", "time the model waited for expert reads", "stall_seconds"),
    ("mixtral_offload_slots", "gauge", "expert slots in memory", "slots"),
]


def _offload_metrics(offload) -> list:
    if offload is None:
        return []
    stats = offload.stats()
    return [(name, kind, text, [({}, stats[key])]) for name, kind, text, key in OFFLOAD_METRICS]
