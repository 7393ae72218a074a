"""Response shapes every service's HTTP API shares."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list: the items, how many there are in all, and where this page starts."""

    items: list[T]
    total: int
    limit: int
    offset: int


def json_body(model: BaseModel) -> dict[str, Any]:
    """A view as the JSON an ``Outcome`` stores and sends."""
    return model.model_dump(mode="json")
