"""The API's error: an exception any layer raises, and OpenAI's error body `{"error": {"message", "type", "param",
"code"}}`, built here only, whether it goes out as a response, as a stream's last event or from the ASGI layer
below the app (app/limits.py)."""

from __future__ import annotations

import re

import msgspec
from litestar import Response

from ringllm.app.responses import ErrorBody, ErrorResponse
from ringllm.ipc.sampling import FieldError

RETRY_AFTER_SECONDS = "1"
_json = msgspec.json.Encoder()


# OpenAI's code for a prompt and output the context cannot hold (LiteLLM and others map it, and the wording below,
# to their context-window error)
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    @classmethod
    def bad_field(cls, error: FieldError) -> ApiError:
        """A 400 naming the request field a FieldError names."""
        return cls(400, str(error), param=error.field)

    @classmethod
    def context_overflow(cls, max_len: int, prompt: int, output: int | None, source: str, param: str) -> ApiError:
        """A 400 for a prompt (`source`: "prompt" or "messages") and output past the context, in OpenAI's and
        vLLM's words and code, naming `param`."""
        asked = "" if output is None else f"; {output} for the completion"
        return cls(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt + (output or 0)} tokens ({prompt} in the {source}{asked}). Please reduce the length of the "
            f"{source}{'' if output is None else ' or completion'}.",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )

    def body(self) -> bytes:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> bytes:
    return _json.encode(ErrorResponse(ErrorBody(message, kind, param, code)))


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> Response:
    # Overload or restart: come back later.
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return Response(
        error_body(message, kind, param, code), status_code=status, media_type="application/json", headers=headers
    )


def invalid_body(problems: list) -> tuple[str, str | None]:
    """(message, param) of a body that failed validation, from Litestar's list of {message, key} problems: the
    field named in param (an unknown field by its name), and a sentence rather than a Python list."""
    parts, param = [], None
    for problem in problems:
        if not isinstance(problem, dict):
            parts.append(str(problem))
            continue
        message, key = str(problem.get("message", "")), problem.get("key")
        unknown = _UNKNOWN_FIELD.search(message)
        where = key if key not in (None, "data") else None  # "data": the body itself
        field = (f"{where}.{unknown.group(1)}" if where else unknown.group(1)) if unknown else where
        param = param or field
        # an unknown field is named in msgspec's message; where it sits (messages[0]) is not
        at = where if unknown else field
        bound = _BOUND.search(message)
        if bound:  # vLLM's (pydantic's) name of the broken bound, which its clients and tests look for
            message += f" ({_PYDANTIC_BOUND[bound.group(1)]})"
        parts.append(f"{at}: {message}" if at else message)
    return "invalid request body: " + "; ".join(parts), param


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_BOUND = re.compile(r"^Expected `(?:int|float)` (>=|<=|>|<) ")
_PYDANTIC_BOUND = {">=": "greater_than_equal", "<=": "less_than_equal", ">": "greater_than", "<": "less_than"}
