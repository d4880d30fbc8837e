"""A registry of kinds: the block kinds and the training methods are each one. A kind is a strict
pydantic options model whose `kind` field is a one-value Literal; registering it makes it part of
the spec's discriminated union, so that a spec names it by that value."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, Field

T = TypeVar("T", bound=BaseModel)


class Registry(dict[str, type[T]], Generic[T]):
    """kind -> options model. A kind may be registered once."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "block kind", "method": for messages

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator adding a kind."""
        kind_field = cls.model_fields.get("kind")
        if kind_field is None:
            raise TypeError(f"{cls.__name__} has no `kind` field")
        (kind,) = typing.get_args(kind_field.annotation)
        if kind in self:
            raise KeyError(f"{self.what} {kind!r} registered twice: {self[kind].__name__} and {cls.__name__}")
        self[kind] = cls
        return cls

    def union(self) -> Any:
        """The discriminated union of every registered kind, for the spec schema."""
        return Annotated[Union[tuple(self.values())], Field(discriminator="kind")]  # noqa: UP007 (built from a tuple)
