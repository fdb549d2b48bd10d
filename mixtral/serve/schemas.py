"""The request and error bodies of the OpenAI-compatible API, as strict pydantic models.

Strict: no type coercion ("5" is not an int, true is not a number), and an unknown field is refused rather than
ignored, so a misspelt parameter is an error. The app's OpenAPI schema (`/openapi.json`) is generated from these.
Errors answer `{"error": {"message", "type", "param", "code"}}`, OpenAI's shape: `APIError` carries one.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from mixtral.io.tokenizer import CHAT_ROLES

MAX_N = 16  # choices per request at most (also capped by the engine's pool and queue)
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 5  # alternatives per token in /v1/completions (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # ... and in /v1/chat/completions (OpenAI's limit)


# ---- requests --------------------------------------------------------------------------------------------------

class Strict(BaseModel):
    # strict: "5" is not an int, true is not a number; forbid: a misspelt parameter is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormatText(Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(Strict):
    # OpenAI's rule for the name; it is not used (the grammar depends on the schema only).
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # "schema" would shadow BaseModel.schema; the JSON field is still "schema". Absent: any JSON value.
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON Schema (2020-12)")
    strict: bool | None = Field(None, description="accepted; the schema is always followed exactly as written")


class ResponseFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _response_format_kind(value: Any) -> str | None:
    # The tag names the class, which the app's error messages drop from a field's path ("response_format.type").
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "ResponseFormatText", "json_object": "ResponseFormatJsonObject",
            "json_schema": "ResponseFormatJsonSchema"}.get(kind) if isinstance(kind, str) else None


ResponseFormat = Annotated[
    Annotated[ResponseFormatText, Tag("ResponseFormatText")]
    | Annotated[ResponseFormatJsonObject, Tag("ResponseFormatJsonObject")]
    | Annotated[ResponseFormatJsonSchema, Tag("ResponseFormatJsonSchema")],
    Discriminator(_response_format_kind, custom_error_type="invalid_response_format",
                  custom_error_message="expected an object with type 'text', 'json_object' or 'json_schema'")]

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
    response_format: ResponseFormat | None = Field(
        None, description="constrain the output: text (free), json_object (a JSON object) or json_schema (an "
                          "instance of json_schema.schema)")


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


# ---- errors ----------------------------------------------------------------------------------------------------

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


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON of an error in OpenAI's shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered in OpenAI's shape, with HTTP status `status` (and `headers`, such as Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)
