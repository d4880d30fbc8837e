"""The block registry: kind -> strict pydantic params model -> nn.Module.

A block kind is a subclass of `Node` with a `kind: Literal[...]` field, registered with
`@register`. Its fields are the YAML keys of a node. Fields typed `Ref`, `Refs` or `Joined`
name other nodes (or graph inputs); the graph compiler wires them and passes one positional
argument per reference field, in declaration order, to the module that `build()` returns.
"""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)

from pipeline.errors import did_you_mean
from pipeline.registry import Registry

Shape = tuple[int, ...]  # per-sample shape, without the batch dimension

REF_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[0-9]+)?$")


class _RefField:
    """Marks a field as a reference to other nodes. `mode` says how its value reaches forward()."""

    def __init__(self, mode: str):
        self.mode = mode  # "one": a tensor; "many": a list of tensors; "joined": concatenated on dim 1


def _check_ref(name: str) -> str:
    if not REF_PATTERN.match(name):
        raise ValueError(
            f"{name!r} is not a node reference: use a node name, or NAME.INDEX for one output of a node with several"
        )
    return name


def _check_refs(names: Any) -> Any:
    if isinstance(names, str):
        names = [names]
    if isinstance(names, list):
        for n in names:
            if isinstance(n, str):
                _check_ref(n)
    return names


Ref = Annotated[str, AfterValidator(_check_ref), _RefField("one")]
Refs = Annotated[list[str], BeforeValidator(_check_refs), Field(min_length=1), _RefField("many")]
Joined = Annotated[list[str], BeforeValidator(_check_refs), Field(min_length=1), _RefField("joined")]

Init = Literal["orthogonal", "normal", "xavier", "equalized_lr", "msr", "default"]
# Input channels are inferred from the graph; a node may state them, and then they are checked.
InChannels = Annotated[PositiveInt | None, Field(description="If set, checked against the input's channels.")]


class BlockError(Exception):
    """A problem with one node, found while building it; `field` is the node's offending key."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.field, self.hint = message, field, hint


def _types(annotation) -> set:
    """The types (and Literal values) a field annotation is made of."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    if typing.get_origin(annotation) is Literal:
        return {type(a) for a in args}
    return set().union(*(_types(a) for a in args if isinstance(a, type) or typing.get_args(a)))


def no_bool_for_a_number(cls, value, info):
    """pydantic reads `true` as 1 for an int field (`train.batch_size=true` trained with batch 1):
    a boolean is refused where the field is a number, or a list or tuple of numbers (`betas`), and
    takes no boolean."""
    annotation = cls.model_fields[info.field_name].annotation
    if isinstance(value, bool):
        types = _types(annotation)
        if types & {int, float} and bool not in types:
            raise ValueError(f"expected a number, not {str(value).lower()}")
    elif isinstance(value, list | tuple) and typing.get_origin(annotation) in (list, tuple):
        types = _types(annotation)
        if types & {int, float} and bool not in types and any(isinstance(v, bool) for v in value):
            shown = ", ".join(str(v).lower() for v in value)
            raise ValueError(f"expected numbers, not [{shown}]")
    return value


class BoolForNumber:
    """Stands in for a `true`/`false` given where a node's field takes a number, so that the
    field's own validation fails at its path (pydantic allows no before-validator on a union's
    `kind` tag, so the field validator above cannot be used on nodes)."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return str(self.value).lower()


def _mark_bools_for_numbers(cls, data):
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, value in data.items():
        info = cls.model_fields.get(key) or next((f for f in cls.model_fields.values() if f.alias == key), None)
        if info is None:
            continue
        types = _types(info.annotation)
        if not types & {int, float} or bool in types:
            continue
        if isinstance(value, bool):
            out[key] = BoolForNumber(value)
        elif isinstance(value, list):
            out[key] = [BoolForNumber(v) if isinstance(v, bool) else v for v in value]
    return out


class Node(BaseModel):
    """Fields every node has. Subclasses add `kind` and their own parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    if TYPE_CHECKING:  # every registered kind declares it, as a Literal; not a field of the base
        kind: str

    @model_validator(mode="before")
    @classmethod
    def refuse_bool_for_a_number(cls, data: Any) -> Any:
        return _mark_bools_for_numbers(cls, data)

    repeat: int = Field(
        1,
        ge=1,
        description=(
            "Build this node N times in a chain, each instance taking the previous one's output as "
            "its `in`; other references are shared. Its name then refers to the last instance."
        ),
    )
    each: dict[str, list[Any]] = Field(
        default_factory=dict,
        description=("Per-instance values of parameters for a repeated node: a list of `repeat` values per key."),
    )

    def bounded_output(self) -> bool:
        """Whether this node's output lies in [-1, 1] whatever its input (a generator's output
        should: the images are scaled to [-1, 1]; ganhacks tip 1)."""
        return False

    # ----- references -----
    @classmethod
    def ref_fields(cls) -> list[tuple[str, str, str]]:
        """(field name, YAML key, mode) of every reference field, in declaration order."""
        out = []
        for name, info in cls.model_fields.items():
            metadata = list(info.metadata)
            for arg in typing.get_args(info.annotation):  # Optional[Ref]: the marker sits one level down
                metadata += list(getattr(arg, "__metadata__", ()))
            for meta in metadata:
                if isinstance(meta, _RefField):
                    out.append((name, info.alias or name, meta.mode))
        return out

    def refs(self) -> dict[str, list[str]]:
        """YAML key -> referenced names (possibly empty for an optional reference)."""
        out = {}
        for name, key, _ in self.ref_fields():
            value = getattr(self, name)
            out[key] = [] if value is None else ([value] if isinstance(value, str) else list(value))
        return out

    # ----- repetition -----
    @model_validator(mode="before")
    @classmethod
    def _each_supplies_required(cls, data):
        # A parameter given only per instance (in `each`) still satisfies a required field.
        if isinstance(data, dict) and isinstance(data.get("each"), dict):
            data = dict(data)
            for key, values in data["each"].items():
                if key in cls.model_fields and isinstance(values, list) and values and key not in data:
                    data[key] = values[0]
        return data

    @model_validator(mode="after")
    def _check_each(self):
        if self.repeat > 1:
            refs = self.ref_fields()
            if not refs or refs[0][1] != "in" or refs[0][2] != "one":
                raise ValueError(f"kind {self.kind!r} cannot be repeated: it has no single `in` input to chain")
        elif self.each:
            raise ValueError("`each` needs `repeat` greater than 1")
        params = {info.alias or name for name, info in type(self).model_fields.items()} - {
            "kind",
            "in",
            "repeat",
            "each",
        }
        for key, values in self.each.items():
            if key not in params:
                hint = did_you_mean(key, params)
                raise ValueError(f"each.{key}: not a parameter of kind {self.kind!r}" + (f"; {hint}" if hint else ""))
            if len(values) != self.repeat:
                raise ValueError(f"each.{key} has {len(values)} values but repeat is {self.repeat}")
        for i in range(self.repeat if self.each else 0):
            try:
                self.instance(i)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(map(str, err["loc"]))
                raise ValueError(f"each.{where}[{i}]: {err['msg']}") from None
        return self

    def instance(self, i: int) -> Node:
        """The i-th instance of a repeated node (the node itself when not repeated)."""
        if self.repeat == 1:
            return self
        data = self.model_dump(by_alias=True, exclude={"repeat", "each"}, exclude_unset=True)
        data["kind"] = self.kind
        data.update({k: v[i] for k, v in self.each.items()})
        return type(self).model_validate(data)

    # ----- building -----
    def build(self, inputs: dict[str, Any], ctx) -> Any:
        """Return the nn.Module for this node; `inputs` maps each reference key to its input
        shape (a list of shapes for a `many` reference). Raise `BlockError` for a mismatch."""
        raise TypeError(f"block kind {type(self).__name__} defines no build(); every registered kind must")


class Weighted(Node):
    """A node with learnable weights: their init and spectral norm may differ from the network's."""

    sn: bool | None = Field(None, description="Spectral norm on this node's weights; default: the network's `sn`.")
    init: Init | None = Field(None, description="Weight init of this node; default: the network's `init`.")


REGISTRY: Registry[Node] = Registry("block kind")
register = REGISTRY.register  # class decorator adding a block kind
node_union = REGISTRY.union  # the discriminated union of every registered kind, for the spec schema
