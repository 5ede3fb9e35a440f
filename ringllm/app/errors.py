"""The API's error: an exception any layer raises, and OpenAI's error body `{"error": {"message", "type", "param",
"code"}}`, built here only, whether it goes out as a response, as a stream's last event or from the ASGI layer
below the app (app/limits.py)."""

from __future__ import annotations

import msgspec
from litestar import Response

from ringllm.app.responses import ErrorBody, ErrorResponse
from ringllm.ipc.sampling import FieldError

RETRY_AFTER_SECONDS = "1"
_json = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    @classmethod
    def bad_field(cls, error: FieldError) -> ApiError:
        """A 400 naming the request field a FieldError names."""
        return cls(400, str(error), param=error.field)

    def body(self) -> bytes:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> bytes:
    return _json.encode(ErrorResponse(ErrorBody(message, kind, param, None)))


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> Response:
    # Overload or restart: come back later.
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return Response(
        error_body(message, kind, param), status_code=status, media_type="application/json", headers=headers
    )
