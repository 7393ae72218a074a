"""The base of every integration event's data.

An event type is named once, on its model: ``jp.nichiiki.<service>.<aggregate>.<what>.v<N>``.
Within a version only optional fields may be added; a breaking change is a new model with the
next version. Consumers ignore fields they do not know, so producers can add optional ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from shared.contracts.topics import Topic

TYPE_PREFIX = "jp.nichiiki."

#: Every event model, by its full CloudEvents type.
EVENT_MODELS: dict[str, type[EventData]] = {}


class EventData(BaseModel):
    """Data of one integration event (the Kafka record's value)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]
    event_name: ClassVar[str]
    event_version: ClassVar[int]
    event_topic: ClassVar[str]

    def __init_subclass__(
        cls, *, name: str | None = None, version: int = 1, topic: Topic | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an abstract intermediate base
            return
        if topic is None:
            raise TypeError(f"event {name} must name the topic it is published on")
        cls.event_name = name
        cls.event_version = version
        cls.event_topic = topic.name
        cls.event_type = f"{TYPE_PREFIX}{name}.v{version}"
        if cls.event_type in EVENT_MODELS and EVENT_MODELS[cls.event_type] is not cls:
            raise TypeError(f"event type {cls.event_type} is defined twice")
        EVENT_MODELS[cls.event_type] = cls


def event_model(event_type: str) -> type[EventData] | None:
    return EVENT_MODELS.get(event_type)
