"""The OpenAI API as the server speaks it: request bodies (validated, with the field and the fix in every
error) and errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tailor.serve.sampling import MAX_LOGPROBS


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status (never 500 for a client's mistake)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist: GET /v1/models lists the base model and the "
                    "adapters this server has.", param="model", code="model_not_found")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _VllmSampling(BaseModel):
    """vLLM's sampling fields, with vLLM's meanings (what benchmark clients such as vLLM's
    benchmark_serving and genai-perf send; tailor.serve.sampling.SamplingParams says what each does)."""

    model_config = ConfigDict(extra="forbid")

    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    top_k: int = Field(default=-1, ge=-1)  # -1 or 0: off
    repetition_penalty: float = Field(default=1.0, gt=0)  # 1: off


class _Common(_VllmSampling):
    """Fields shared by completions and chat completions; OpenAI's defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # structured output (tailor.serve.constraints)
    # accepted at their "off" values only (anything else is a 400 naming the field)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # OpenAI request metadata: accepted, not used
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> list[str]:
        found = []
        if self.presence_penalty or self.frequency_penalty:
            found.append("presence_penalty/frequency_penalty")
        if self.logit_bias:
            found.append("logit_bias")
        return found


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 only with echo: the prompt's logprobs alone
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _nothing_to_generate(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns only the prompt, so it needs echo: true; "
                             "else ask for at least 1 token")
        return self

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        found += [name for name, off in (("best_of", self.best_of in (None, 1)), ("suffix", not self.suffix))
                  if not off]
        return found


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, refusal, ...: not used by chat templates here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            found.append("tools")
        return found


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a request body; a 400 naming the first bad field and what it must be."""
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {type(data).__name__}.")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise bad_request(f"Unrecognized request argument supplied: {param}.", param=param) from None
        if param is None:  # a rule between fields (a model validator): its message names them
            message = first["msg"].removeprefix("Value error, ")
            raise bad_request(f"{message}.", param=message.split()[0]) from None
        raise bad_request(f"Invalid value for {param!r}: {first['msg']}.", param=param) from None
    unsupported = request.unsupported()
    if unsupported:
        raise bad_request(f"{', '.join(unsupported)} not supported by this server; leave them out.",
                          param=unsupported[0].split("/")[0])
    return request
