"""Database errors that are the client's, mapped to the answer they deserve.

A write can fail because of what the client sent or because another request got there first: a
taken e-mail address, a user deleted while their post was being written, a row deleted while it was
being updated. Each is named by the constraint it broke, never guessed from the exception class
alone: an IntegrityError that the table below does not name is a bug, and stays a server error.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

# Constraint (PostgreSQL's name, or SQLite's "table.column") -> the answer.
CONSTRAINTS: dict[str, tuple[int, str]] = {
    "ix_users_email": (status.HTTP_409_CONFLICT, "email already registered"),
    "users.email": (status.HTTP_409_CONFLICT, "email already registered"),
    "posts_author_id_fkey": (status.HTTP_404_NOT_FOUND, "user not found"),
    # SQLite names no foreign key in its message; posts.author_id is the schema's only one.
    "FOREIGN KEY": (status.HTTP_404_NOT_FOUND, "user not found"),
}

_SQLITE_CONSTRAINT = re.compile(r"UNIQUE constraint failed: ([\w.]+)|(FOREIGN KEY) constraint failed")


def constraint_name(error: IntegrityError) -> str | None:
    """The name of the constraint a write broke, as the driver reports it."""
    # asyncpg's exception (the cause of SQLAlchemy's adapted one) and psycopg's diagnostics.
    for candidate in (error.orig, getattr(error.orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str):
            return name
        diag = getattr(candidate, "diag", None)
        name = getattr(diag, "constraint_name", None)
        if isinstance(name, str):
            return name
    match = _SQLITE_CONSTRAINT.search(str(error.orig))
    return (match.group(1) or match.group(2)) if match else None


@asynccontextmanager
async def client_errors(gone: str) -> AsyncIterator[None]:
    """Around a flush: a known constraint becomes its answer; a row that vanished under an UPDATE
    or DELETE (another request deleted it first) is ``404 {gone}``."""
    try:
        yield
    except IntegrityError as error:
        answer = CONSTRAINTS.get(constraint_name(error) or "")
        if answer is None:
            raise
        raise HTTPException(*answer) from None
    except StaleDataError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, gone) from None


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. A 422 echoes the client's input, which may hold
    a lone surrogate ("\\ud800" is valid JSON but no Unicode): the default encoder fails on it and
    the client's mistake would become a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return AsciiJSONResponse(
        {"detail": jsonable_encoder(error.errors())}, status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def answer_client_errors_safely(app: FastAPI) -> None:
    """FastAPI's own 422 answer, encoded so that any input can be echoed back."""
    app.add_exception_handler(RequestValidationError, _validation_error)
