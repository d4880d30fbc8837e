"""`load_spec`: one way in for validate, train, profile and sample.

YAML file (safe loader) -> base specs merged -> `key=value` overrides -> pydantic -> graph checks.
Every problem becomes an `Issue` with file, line, dotted path and a hint; all are reported at once.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from pipeline.blocks.registry import REGISTRY, BoolForNumber
from pipeline.errors import Issue, SpecError, did_you_mean, user_error
from pipeline.methods import METHODS
from pipeline.spec.schema import MOVED_TO_METHOD, Spec
from pipeline.spec.yaml_io import SourceMap, load_yaml_mapping, read_yaml

# The shipped specs: `specs/` beside the package in a checkout (and an editable install); inside
# the package in a wheel, where pyproject.toml maps `specs/` to `pipeline/specs/`.
_PACKAGE = Path(__file__).resolve().parents[1]
SPECS_DIR = next((d for d in (_PACKAGE.parent / "specs", _PACKAGE / "specs") if d.is_dir()), _PACKAGE.parent / "specs")
COMMAND_LINE = "command line"


@dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    sources: SourceMap
    path: Path

    def where(self, loc) -> tuple[str | None, int | None]:
        return self.sources.where(loc)


# ----- finding spec files -----
def resolve_spec_path(arg: str) -> Path:
    """A name in specs/ (`biggan_deep_256`) or a path to a YAML file."""
    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or "/" in arg or path.exists():
        return path
    candidate = SPECS_DIR / f"{arg}.yaml"
    if not candidate.exists():
        names = [p.stem for p in SPECS_DIR.glob("*.yaml")]
        raise user_error(f"no spec named {arg!r} in {SPECS_DIR}", hint=did_you_mean(arg, names))
    return candidate


def _base_path(name: object, file: str | None, line: int | None) -> Path:
    if not isinstance(name, str) or not name or len(name) > 200 or any(c in name for c in "/\\\0") or name[0] == ".":
        raise user_error(
            f"{name!r} is not a spec name",
            path="base",
            file=file,
            line=line,
            hint="base names a spec inside specs/, e.g. base: biggan_deep_128",
        )
    path = (SPECS_DIR / f"{name.removesuffix('.yaml')}.yaml").resolve()
    if path.parent != SPECS_DIR.resolve():
        raise user_error(f"{name!r} is outside specs/", path="base", file=file, line=line)
    if not path.exists():
        names = [p.stem for p in SPECS_DIR.glob("*.yaml")]
        raise user_error(
            f"base spec {name!r} not found in specs/", path="base", file=file, line=line, hint=did_you_mean(name, names)
        )
    return path


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _null_has_a_meaning(tp) -> bool:
    """Whether the schema gives `null` a meaning of its own at a field of type `tp`."""
    if tp is None:
        return False
    try:
        TypeAdapter(tp).validate_python(None)
    except ValidationError:
        return False
    return True


def _merge(base: dict, child: dict, tp=Spec) -> dict:
    """Mappings merge key by key; other values replace; a node whose kind changes is replaced
    whole; `null` in place of a mapping (a section or a node) removes it, so the default applies,
    unless null means something there (`train.ema: null`: no EMA; `eval: null`: no evaluation
    during training): then it means that, as in a spec without a base."""
    out = dict(base)
    fields, open_keys = _keys_at(tp, base)
    for key, value in child.items():
        old = out.get(key)
        field = None if open_keys else (fields or {}).get(key)
        if value is None and isinstance(old, dict):
            if _null_has_a_meaning(field):
                out[key] = None
            else:
                del out[key]
        elif (
            isinstance(old, dict)
            and isinstance(value, dict)
            and old.get("kind", value.get("kind")) == value.get("kind", old.get("kind"))
        ):
            out[key] = _merge(old, value, (fields or {}).get(key))
        else:
            out[key] = value
    return out


MAX_BASES = 16  # a chain of base specs this long is a loop in disguise or a mistake


def _load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, SourceMap]:
    if len(chain) >= MAX_BASES:
        raise user_error(
            f"more than {MAX_BASES} base specs in a chain: {' -> '.join(p.stem for p in chain[:4])} -> ...",
            path="base",
            file=_display(chain[0]),
        )
    data, sources = load_yaml_mapping(path, _display(path))
    if isinstance(data.get("method"), str):  # `method: cycle` is short for {kind: cycle}
        data["method"] = {"kind": data["method"]}
    if path.resolve() in chain:
        names = " -> ".join(p.stem for p in chain + (path.resolve(),))
        raise user_error(f"base specs form a cycle: {names}", path="base", file=_display(path))
    if data.get("base") is None:
        return data, sources
    file, line = sources.where(("base",))
    base_data, base_sources = _load_with_bases(_base_path(data["base"], file, line), chain + (path.resolve(),))
    base_data = dict(base_data)
    base_data.pop("name", None)  # a derived spec is named after its own file unless it says otherwise
    merged_sources = SourceMap(base_sources)
    merged_sources.update(sources)
    return _merge(base_data, data), merged_sources


def _unshared(value):
    """A copy in which no mapping or list appears twice: a YAML alias (`G_BA: *resnet_generator`)
    loads as the very object of its anchor, and an override of one would change both."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


# ----- overrides -----
def _strip(tp):
    """Remove Annotated and Optional wrappers from a type hint."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
            else:
                return tp
        else:
            return tp


def _fields(model: type[BaseModel]) -> dict[str, object]:
    return {(info.alias or name): info.annotation for name, info in model.model_fields.items()}


def _keys_at(tp, data) -> tuple[dict[Any, object] | None, bool]:
    """(key -> child type) valid at a level, and whether the level accepts any key (a dict, whose
    keys may be numbers: resolutions)."""
    tp = _strip(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _fields(tp), False
    if typing.get_origin(tp) is dict:
        return {k: typing.get_args(tp)[1] for k in (data or {})}, True
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and isinstance(data, dict):
        # a discriminated union (block kinds, methods): the member whose `kind` the data names
        for member in typing.get_args(tp):
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and data.get("kind") in typing.get_args(kind.annotation):
                return _fields(member), False
    return None, False


def parse_override(text: str) -> tuple[list[str], object]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise user_error(
            f"override {text!r} is not key=value",
            file=COMMAND_LINE,
            hint="write a dotted key and a value, e.g. train.max_steps=100 or compile.enabled=true",
        )
    value = read_yaml(raw, COMMAND_LINE)[0] if raw.strip() else ""
    return key.split("."), value


def apply_override(data: dict, sources: SourceMap, keys: list[str], value) -> None:
    """Set a dotted key, checking every key against the schema and the spec's node names."""
    tp: object = Spec
    node = data
    path: list[str | int] = list(keys)  # the keys, a number where the mapping is keyed by numbers
    for depth, name in enumerate(keys):
        key: str | int = name
        allowed, open_keys = _keys_at(tp, node)
        if open_keys and allowed is not None and name.isdigit() and int(name) in allowed:
            key = path[depth] = int(name)  # a mapping keyed by numbers (resolutions)
        dotted = ".".join(map(str, path[: depth + 1]))
        if allowed is None or (key not in allowed and not (open_keys and depth == len(keys) - 1)):
            choices = list(allowed or {})
            hint = did_you_mean(str(key), choices) if choices else "this value has no sub-keys"
            if dotted in {f"train.{k}" for k in MOVED_TO_METHOD}:
                hint = f"an option of the training method now: method.{key}=..."
            raise user_error(f"unknown key {key!r}", path=dotted, file=COMMAND_LINE, hint=hint)
        if depth == len(keys) - 1:
            node[key] = value
            for stale in [loc for loc in sources if loc[: len(path)] == tuple(path)]:
                del sources[stale]  # the file's lines for the replaced value (betas.0, ...) no longer apply
            sources[tuple(path)] = (COMMAND_LINE, None)
            return
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise user_error(f"{dotted} is a value, not a section", path=dotted, file=COMMAND_LINE)
        tp, node = allowed[key], child


# ----- pydantic errors -> issues -----
def _clean_loc(loc: tuple, data: dict) -> tuple:
    """Drop what pydantic inserts: the kind tag after a node's name and `[key]` for a bad key."""
    loc = tuple(part for part in loc if part != "[key]")
    out = []
    i = 0
    while i < len(loc):
        out.append(loc[i])
        if len(out) >= 3 and out[-2] == "nodes" and i + 1 < len(loc) and loc[i + 1] in REGISTRY:
            i += 1  # skip the kind tag
        elif out == ["method"] and i + 1 < len(loc) and loc[i + 1] in METHODS:
            i += 1
        i += 1
    return tuple(out)


def _issue_from_pydantic(err: ErrorDetails, data: dict, sources: SourceMap) -> Issue:
    loc = _clean_loc(tuple(err["loc"]), data)
    file, line = sources.where(loc)
    path = ".".join(map(str, loc))
    kind, msg, hint = err["type"], err["msg"], None
    if isinstance(err.get("input"), BoolForNumber):
        msg = f"expected a number, not {err['input']!r}"
    elif kind == "extra_forbidden":
        msg = "unknown key"
        parent = loc[:-1]
        tp: object = Spec
        node: object = data
        for key in parent:
            allowed, _ = _keys_at(tp, node)
            tp = (allowed or {}).get(key)
            node = node.get(key) if isinstance(node, dict) else None
        allowed, _ = _keys_at(tp, node)
        hint = did_you_mean(str(loc[-1]), allowed or [])
    elif kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        known, what = (METHODS, "method") if loc == ("method",) else (REGISTRY, "block kind")
        msg = f"unknown {what} {tag!r}"
        hint = did_you_mean(str(tag), known) or f"known {what.split()[-1]}s: {', '.join(sorted(known))}"
    elif kind == "union_tag_not_found":
        msg = "node has no `kind`"
        hint = f"known kinds: {', '.join(sorted(REGISTRY))}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "string_pattern_mismatch" and len(loc) >= 2 and loc[-2] == "nodes":
        msg = "node names must be identifiers (letters, digits, underscores; not starting with a digit)"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind == "model_type" or kind == "dict_type":
        msg = f"expected a mapping, got {type(err.get('input')).__name__}"
    return Issue(msg, path, file, line, hint)


def load_spec(arg: str | Path, overrides: Sequence[str] = (), *, check_graphs: bool = True) -> LoadedSpec:
    """Load, merge, override and validate a spec; raise `SpecError` listing every problem."""
    path = resolve_spec_path(str(arg))
    data, sources = _load_with_bases(path)
    data = _unshared(data)
    data.setdefault("name", path.stem)
    data.setdefault("method", {"kind": "gan"})  # the default method, spelled out so overrides can reach its options
    issues: list[Issue] = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
            apply_override(data, sources, keys, value)
        except SpecError as exc:
            issues.extend(exc.issues)
    if issues:
        raise SpecError(issues)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_issue_from_pydantic(e, data, sources) for e in exc.errors()]) from None
    loaded = LoadedSpec(spec, sources, path)
    if check_graphs:
        from pipeline.graph import analyze_spec

        analyze_spec(loaded)
    return loaded
