"""Errors of the HTTP API in OpenAI's JSON shape.

raise APIError(400, "temperature=3 must be in [0, 2]", param="temperature")
-> HTTP 400  {"error": {"message": "...", "type": "invalid_request_error",
                        "param": "temperature", "code": null}}
"""

from __future__ import annotations

from typing import Any

# OpenAI's error `type` for each status this server answers with
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An HTTP error answer: status code, a message naming the bad value and what is valid, the
    request field it concerns (`param`) and a machine-readable `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, message: str) -> APIError:
    """A 400 about one request field."""
    return APIError(400, message, param=param)
