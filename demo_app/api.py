"""Users and posts: create, read, list with pagination, update, delete.

Every answer to a client's mistake or to a lost race is a 4xx: ids beyond the id column's range are
refused (422), a row deleted by another request is 404, a taken e-mail is 409 (see errors.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from sqlalchemy import Result, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from .db import get_session
from .errors import client_errors
from .models import Post, User
from .schemas import Page, PostCreate, PostOut, PostUpdate, UserCreate, UserOut, UserUpdate

# The id columns are INTEGER: PostgreSQL refuses a larger parameter with a DataError, SQLite's
# driver with an OverflowError. Refused here instead, as the client's mistake.
MAX_ID = 2**31 - 1

router = APIRouter()
Session = Annotated[AsyncSession, Depends(get_session)]
Limit = Annotated[int, Query(ge=1, le=100)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
UserId = Annotated[int, Path(ge=1, le=MAX_ID)]
PostId = Annotated[int, Path(ge=1, le=MAX_ID)]


async def _user_or_404(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "user not found")
    return user


def _rowcount(result: Result[Any]) -> int:
    count: int = getattr(result, "rowcount", 0)
    return count


async def _post_or_404(session: AsyncSession, user_id: int, post_id: int) -> Post:
    post = await session.get(Post, post_id)
    if post is None or post.author_id != user_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "post not found")
    return post


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def create_user(body: UserCreate, session: Session) -> User:
    user = User(email=body.email, name=body.name)
    session.add(user)
    async with client_errors("user not found"):
        await session.flush()
    return user


@router.get("/users", response_model=Page[UserOut])
async def list_users(session: Session, limit: Limit = 20, offset: Offset = 0) -> dict[str, object]:
    total = await session.scalar(select(func.count()).select_from(User))
    rows = await session.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return {"items": list(rows), "total": total or 0, "limit": limit, "offset": offset}


@router.get("/users/{user_id}", response_model=UserOut)
async def read_user(user_id: UserId, session: Session) -> User:
    return await _user_or_404(session, user_id)


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: UserId, body: UserUpdate, session: Session) -> User:
    user = await _user_or_404(session, user_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(user, field, value)
    async with client_errors("user not found"):
        await session.flush()
    return user


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(user_id: UserId, session: Session) -> Response:
    # One statement, its row count the answer: of two requests deleting the same user, one gets
    # 204 and the other 404. The database deletes the user's posts with it (ON DELETE CASCADE).
    result = await session.execute(delete(User).where(User.id == user_id))
    if _rowcount(result) == 0:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "user not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/posts", status_code=status.HTTP_201_CREATED, response_model=PostOut)
async def create_post(user_id: UserId, body: PostCreate, session: Session) -> Post:
    await _user_or_404(session, user_id)
    post = Post(author_id=user_id, title=body.title, body=body.body)
    session.add(post)
    async with client_errors("user not found"):
        await session.flush()
    return post


@router.get("/users/{user_id}/posts", response_model=Page[PostOut])
async def list_posts(
    user_id: UserId, session: Session, limit: Limit = 20, offset: Offset = 0
) -> dict[str, object]:
    await _user_or_404(session, user_id)
    where = Post.author_id == user_id
    total = await session.scalar(select(func.count()).select_from(Post).where(where))
    rows = await session.scalars(select(Post).where(where).order_by(Post.id).limit(limit).offset(offset))
    return {"items": list(rows), "total": total or 0, "limit": limit, "offset": offset}


@router.get("/users/{user_id}/posts/{post_id}", response_model=PostOut)
async def read_post(user_id: UserId, post_id: PostId, session: Session) -> Post:
    return await _post_or_404(session, user_id, post_id)


@router.patch("/users/{user_id}/posts/{post_id}", response_model=PostOut)
async def update_post(user_id: UserId, post_id: PostId, body: PostUpdate, session: Session) -> Post:
    post = await _post_or_404(session, user_id, post_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(post, field, value)
    async with client_errors("post not found"):
        await session.flush()
    return post


@router.delete("/users/{user_id}/posts/{post_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_post(user_id: UserId, post_id: PostId, session: Session) -> Response:
    statement = delete(Post).where(Post.id == post_id, Post.author_id == user_id)
    if _rowcount(await session.execute(statement)) == 0:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "post not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
