"""The spec reference in Markdown, written from the JSON Schema of specs (`Spec.model_json_schema()`):
every section and setting, each method and each block kind with its fields, their types, defaults
and descriptions. `python -m pipeline schema --markdown docs/spec-reference.md` writes it; a test
checks that the checked-in file is current.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel

REGENERATE = "python -m pipeline schema --markdown docs/spec-reference.md"

Schema = dict[str, Any]


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _cell(text: str) -> str:
    """Text fit for one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _bounds(t: Schema) -> str:
    parts = []
    for key, sign in (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<=")):
        if key in t:
            parts.append(f"{sign} {t[key]}")
    if t.get("minItems") == t.get("maxItems") is not None:
        parts.append(f"{t['minItems']} items")
    else:
        parts += [
            f"{t[key]} {more} items" for key, more in (("minItems", "or more"), ("maxItems", "or fewer")) if key in t
        ]
    return f" ({', '.join(parts)})" if parts else ""


def type_text(t: Schema, names: dict[str, str]) -> str:
    """A field's type in words; a reference to a model links to its section."""
    if "$ref" in t:
        target = _ref_name(t["$ref"])
        return f"[{names.get(target, target)}](#{target.lower()})"
    if "const" in t:
        return f"`{json.dumps(t['const'])}`"
    if "enum" in t:
        return " | ".join(f"`{json.dumps(v)}`" for v in t["enum"])
    if "discriminator" in t:
        mapping = t["discriminator"]["mapping"]
        if len(mapping) > 5:
            key = t["discriminator"]["propertyName"]
            return f"one of {len(mapping)} kinds, by `{key}`: see [block kinds](#block-kinds)"
        return " | ".join(f"[`{kind}`](#{_ref_name(ref).lower()})" for kind, ref in sorted(mapping.items()))
    for union in ("anyOf", "oneOf"):
        if union in t:
            options = [o for o in t[union] if o.get("type") != "null"]
            text = " or ".join(type_text(o, names) for o in options)
            return text + (" or null" if len(options) < len(t[union]) else "")
    kind = t.get("type")
    if kind == "array":
        if "prefixItems" in t:
            return "[" + ", ".join(type_text(i, names) for i in t["prefixItems"]) + "]" + _bounds(t)
        items = t.get("items") or {}
        return ("list of " + type_text(items, names) if items else "list") + _bounds(t)
    if kind == "object":
        value = t.get("additionalProperties")
        if "patternProperties" in t:
            value = next(iter(t["patternProperties"].values()))
        if isinstance(value, dict) and value:
            return "mapping of name to " + type_text(value, names)
        return "mapping"
    if kind is None:
        return "any"
    return str(kind) + _bounds(t)


def _models(cls: type[BaseModel], found: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """The pydantic models a model's fields refer to, by class name (the schema's $defs names)."""

    def visit(annotation: Any) -> None:
        model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if model and annotation.__name__ not in found:
            found[annotation.__name__] = annotation
            _models(annotation, found)
        for arg in typing.get_args(annotation):
            visit(arg)

    for info in cls.model_fields.values():
        visit(info.annotation)
    return found


def _factory_default(info: Any) -> str | None:
    """A default made by a default_factory, which the JSON Schema leaves out."""
    factory = info.default_factory
    if factory is None:
        return None
    if isinstance(factory, type) and issubclass(factory, BaseModel):
        return "its fields' defaults"
    value = factory()
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json", exclude_defaults=True)
        if "kind" in type(value).model_fields:  # which kind, even where it is the default
            dumped = {"kind": value.model_dump(mode="json")["kind"], **dumped}
        return f"`{json.dumps(dumped)}`, other fields at their defaults" if dumped else "its fields' defaults"
    return f"`{json.dumps(value)}`"


def _default(field: str, t: Schema, required: list[str], model: type[BaseModel] | None) -> str:
    if field in required:
        return "required"
    if "default" in t:
        return f"`{json.dumps(t['default'])}`"
    made = _factory_default(model.model_fields[field]) if model and field in model.model_fields else None
    return made or "see description"


def _fields_table(
    model: Schema, names: dict[str, str], skip: frozenset[str] = frozenset(), cls: type[BaseModel] | None = None
) -> list[str]:
    required = model.get("required", [])
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for field, t in model.get("properties", {}).items():
        if field in skip:
            continue
        rows.append(
            f"| `{field}` | {_cell(type_text(t, names))} | {_cell(_default(field, t, required, cls))} "
            f"| {_cell(t.get('description', ''))} |"
        )
    return rows if len(rows) > 2 else ["(no fields of its own)"]


def _model_section(
    level: str,
    heading: str,
    anchor: str,
    model: Schema,
    names: dict[str, str],
    cls: type[BaseModel] | None,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    lines = [f'<a id="{anchor.lower()}"></a>', "", f"{level} {heading}", ""]
    if model.get("description"):
        lines += [" ".join(model["description"].split()), ""]
    return lines + _fields_table(model, names, skip, cls) + [""]


def _reached(schema: Schema, later: set[str]) -> list[str]:
    """Every model the schema refers to, breadth first from the top level; the models named in
    `later` (methods, block kinds) are walked after all others, so the top level's sections and
    their settings come first."""
    order: list[str] = []
    queue: list[Any] = [schema]
    deferred: list[Any] = []

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [_ref_name(node["$ref"])] if "$ref" in node else []
            return found + [
                r for key, value in node.items() if key not in ("discriminator", "$defs") for r in refs(value)
            ]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    while queue or deferred:
        node = queue.pop(0) if queue else deferred.pop(0)
        for name in refs(node):
            if name not in order:
                order.append(name)
                (deferred if name in later else queue).append(schema["$defs"][name])
    return order


def schema_markdown(spec: type[BaseModel]) -> str:
    """The reference of a spec model (`pipeline.spec.Spec`) in Markdown."""
    schema = spec.model_json_schema()
    classes = _models(spec, {})
    defs: dict[str, Schema] = schema["$defs"]
    methods = schema["properties"]["method"]["discriminator"]["mapping"]
    method_models = {_ref_name(ref): kind for kind, ref in methods.items()}
    nodes = schema["$defs"]["NetworkSpec"]["properties"]["nodes"]["patternProperties"]
    block_mapping = next(iter(nodes.values()))["discriminator"]["mapping"]
    block_models = {_ref_name(ref): kind for kind, ref in block_mapping.items()}
    names = {name: f"method `{kind}`" for name, kind in method_models.items()}
    names |= {name: f"block `{kind}`" for name, kind in block_models.items()}
    names |= {name: name for name in defs if name not in names}

    # fields every block kind takes alike (repeat, sn, init, in, ...): listed once
    block_schemas = [defs[name] for name in block_models]
    common = [
        field
        for field, t in block_schemas[0]["properties"].items()
        if field != "kind" and all(b["properties"].get(field) == t for b in block_schemas)
    ]

    out = [
        "# Spec reference",
        "",
        f"Generated from the spec schema by `{REGENERATE}`; do not edit by hand (a test",
        "fails when this file is not current). The same schema as JSON, for editors: `just schema`.",
        "",
        " ".join(schema.get("description", "").split()),
        "",
        "Contents: [top level](#top-level), [sections and settings](#sections-and-settings),",
        "[methods](#methods) (" + ", ".join(f"[`{k}`](#{n.lower()})" for n, k in sorted(method_models.items())) + "),",
        "[block kinds](#block-kinds) ("
        + ", ".join(f"[`{k}`](#{n.lower()})" for k, n in sorted((k, n) for n, k in block_models.items()))
        + ").",
        "",
        '<a id="top-level"></a>',
        "",
        "## Top level",
        "",
        *_fields_table(schema, names, cls=spec),
        "",
        "## Sections and settings",
        "",
    ]
    for name in _reached(schema, set(method_models) | set(block_models)):
        if name in method_models or name in block_models:
            continue
        out += _model_section("###", name, name, defs[name], names, classes.get(name))
    out += ["## Methods", "", "`method.kind`, with the method's own options beside it.", ""]
    for name, kind in sorted(method_models.items(), key=lambda item: item[1]):
        out += _model_section("###", f"`{kind}` ({name})", name, defs[name], names, classes.get(name))
    out += [
        "## Block kinds",
        "",
        "A node of a network's `nodes:` names its `kind`, its inputs and its parameters.",
        "",
        "Every kind also takes these fields:",
        "",
        *_fields_table(
            {"properties": {f: block_schemas[0]["properties"][f] for f in common}},
            names,
            cls=classes.get(next(iter(block_models))),
        ),
        "",
    ]
    for name, kind in sorted(block_models.items(), key=lambda item: item[1]):
        out += _model_section(
            "###", f"`{kind}` ({name})", name, defs[name], names, classes.get(name), frozenset({"kind", *common})
        )
    return "\n".join(out).rstrip() + "\n"
