"""Request and response bodies.

Every text field refuses what the database would refuse later with a server error: NUL characters
(PostgreSQL's text cannot hold them) and lone UTF-16 surrogates (no database encoding can). A PATCH
may leave a field out, but never set it to null: the columns are NOT NULL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, field_validator
from pydantic.json_schema import SkipJsonSchema


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_storable)]
Title = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_storable)]
Body = Annotated[str, Field(max_length=100_000), AfterValidator(_storable)]


class _Patch(BaseModel):
    """A partial update: fields may be left out, not set to null."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be left out, but not null")
        return value


class UserCreate(BaseModel):
    email: EmailStr
    name: Name


class UserUpdate(_Patch):
    # SkipJsonSchema: the schema (and so the fuzzer and client generators) says string, not null.
    email: EmailStr | SkipJsonSchema[None] = None
    name: Name | SkipJsonSchema[None] = None


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    created_at: datetime


class PostCreate(BaseModel):
    title: Title
    body: Body = ""


class PostUpdate(_Patch):
    title: Title | SkipJsonSchema[None] = None
    body: Body | SkipJsonSchema[None] = None


class PostOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    author_id: int
    title: str
    body: str
    created_at: datetime


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
