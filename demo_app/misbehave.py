"""Endpoints that misbehave on purpose, so poolwatch has something to catch (filled by issue 5)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["misbehave"])
