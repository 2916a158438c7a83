"""Users and posts: create, read, list with pagination, update, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .db import get_session
from .models import Post, User
from .schemas import Page, PostCreate, PostOut, PostUpdate, UserCreate, UserOut, UserUpdate

router = APIRouter()
Session = Annotated[AsyncSession, Depends(get_session)]
Limit = Annotated[int, Query(ge=1, le=100)]
Offset = Annotated[int, Query(ge=0)]


async def _user_or_404(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "user not found")
    return user


async def _save_user(session: AsyncSession, user: User) -> User:
    """Flush and reload a user; a taken e-mail is the client's conflict, not a server error."""
    try:
        await session.flush()
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, "email already registered") from None
    await session.refresh(user)
    return user


async def _post_or_404(session: AsyncSession, user_id: int, post_id: int) -> Post:
    post = await session.get(Post, post_id)
    if post is None or post.author_id != user_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "post not found")
    return post


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def create_user(body: UserCreate, session: Session) -> User:
    user = User(email=body.email, name=body.name)
    session.add(user)
    return await _save_user(session, user)


@router.get("/users", response_model=Page[UserOut])
async def list_users(session: Session, limit: Limit = 20, offset: Offset = 0) -> dict[str, object]:
    total = await session.scalar(select(func.count()).select_from(User))
    rows = await session.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return {"items": list(rows), "total": total or 0, "limit": limit, "offset": offset}


@router.get("/users/{user_id}", response_model=UserOut)
async def read_user(user_id: int, session: Session) -> User:
    return await _user_or_404(session, user_id)


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: int, body: UserUpdate, session: Session) -> User:
    user = await _user_or_404(session, user_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(user, field, value)
    return await _save_user(session, user)


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(user_id: int, session: Session) -> Response:
    user = await _user_or_404(session, user_id)
    await session.delete(user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/posts", status_code=status.HTTP_201_CREATED, response_model=PostOut)
async def create_post(user_id: int, body: PostCreate, session: Session) -> Post:
    await _user_or_404(session, user_id)
    post = Post(author_id=user_id, title=body.title, body=body.body)
    session.add(post)
    await session.flush()
    await session.refresh(post)
    return post


@router.get("/users/{user_id}/posts", response_model=Page[PostOut])
async def list_posts(
    user_id: int, session: Session, limit: Limit = 20, offset: Offset = 0
) -> dict[str, object]:
    await _user_or_404(session, user_id)
    where = Post.author_id == user_id
    total = await session.scalar(select(func.count()).select_from(Post).where(where))
    rows = await session.scalars(select(Post).where(where).order_by(Post.id).limit(limit).offset(offset))
    return {"items": list(rows), "total": total or 0, "limit": limit, "offset": offset}


@router.get("/users/{user_id}/posts/{post_id}", response_model=PostOut)
async def read_post(user_id: int, post_id: int, session: Session) -> Post:
    return await _post_or_404(session, user_id, post_id)


@router.patch("/users/{user_id}/posts/{post_id}", response_model=PostOut)
async def update_post(user_id: int, post_id: int, body: PostUpdate, session: Session) -> Post:
    post = await _post_or_404(session, user_id, post_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(post, field, value)
    await session.flush()
    await session.refresh(post)
    return post


@router.delete("/users/{user_id}/posts/{post_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_post(user_id: int, post_id: int, session: Session) -> Response:
    post = await _post_or_404(session, user_id, post_id)
    await session.delete(post)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
