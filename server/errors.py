"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with its status codes."""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.message, self.status, self.param, self.code, self.type)


def error_body(message: str, param: str | None = None, code: str | None = None, type="invalid_request_error"):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None, type="invalid_request_error"
) -> JSONResponse:
    return JSONResponse(error_body(message, param, code, type), status_code=status)


# A ValueError from SamplingParams starts with the field name ("top_p must be in (0, 1], ...").
_FIELD = re.compile(r"^([a-z_]+) (?:must|has|is)\b")


def from_value_error(error: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError from the engine (validation of a request) as a 400 naming the parameter."""
    message = str(error)
    match = _FIELD.match(message)
    param = match.group(1) if match else default_param
    if param == "prompt" and default_param:  # the engine's prompt is a chat request's messages
        param = default_param
    code = "context_length_exceeded" if "context length" in message else None
    return APIError(message, 400, param, code)


def _validation_message(error: dict) -> tuple[str, str | None]:
    """pydantic's first error as (message, param): `body.messages.0.content` -> messages."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {error.get('msg')}", None
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return f"Invalid value for '{where}': {error.get('msg')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = _validation_message(errors[0]) if errors else ("Invalid request", None)
        return error_response(message, 400, param)

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError):
        return error_response(f"We could not parse the JSON body of your request: {exc}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(str(exc.detail), exc.status_code, type=kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(f"internal error: {exc!r}", 500, type="server_error")
