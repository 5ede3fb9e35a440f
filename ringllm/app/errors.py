"""The API's error: an exception any layer raises, and the OpenAI-shaped response it becomes."""

from __future__ import annotations

import msgspec
from litestar import Response

from ringllm.app.schemas import ErrorBody, ErrorResponse

RETRY_AFTER_SECONDS = "1"
_json = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> Response:
    body = ErrorResponse(ErrorBody(message, kind, param, None))
    # Overload or restart: come back later.
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)
