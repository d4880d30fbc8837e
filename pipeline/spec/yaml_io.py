"""Safe YAML loading that remembers where every key came from.

`load_yaml_mapping` returns the document as plain Python data plus a `SourceMap` from dotted
paths to (file, line), so that errors can point at the line a user wrote. Duplicate keys, which
PyYAML would silently resolve to the last one, are errors.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import Issue, SpecError, user_error

Loc = tuple  # a path into the document: ("generator", "nodes", "fc", "out_features")


class SourceMap(dict):
    """Maps a path tuple to (file, line). Looks up the nearest recorded ancestor."""

    def where(self, loc: Loc) -> tuple[str | None, int | None]:
        loc = tuple(loc)
        while loc:
            if loc in self:
                return self[loc]
            loc = loc[:-1]
        return self.get((), (None, None))


MAX_SPEC_BYTES = 1 << 20  # a spec is a few KB; anything this large is a mistake or an attack
MAX_NODES = 100_000  # YAML nodes after aliases are expanded (the "billion laughs" bound)
MAX_DEPTH = 64  # nesting of mappings and lists


class _Budget:
    def __init__(self, file: str):
        self.file, self.nodes = file, 0

    def spend(self, loc: Loc) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise user_error(
                f"the document expands to more than {MAX_NODES:,} values (through YAML aliases?)",
                file=self.file,
                hint="a spec is small; aliases that refer to aliases multiply its size",
            )
        if len(loc) > MAX_DEPTH:
            raise user_error(
                f"nested more than {MAX_DEPTH} levels deep", path=".".join(map(str, loc[:8])) + ".…", file=self.file
            )


def _walk(node: yaml.Node, loc: Loc, file: str, out: SourceMap, issues: list[Issue], budget: _Budget) -> None:
    budget.spend(loc)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key == "<<":  # merge key: its content is attributed to the merged anchor
                continue
            if key in seen:
                issues.append(
                    Issue(
                        f"duplicate key {key!r} (first defined on line {seen[key]})",
                        path=".".join(map(str, loc + (key,))),
                        file=file,
                        line=line,
                        hint="every key, and so every node name, may appear only once in a mapping",
                    )
                )
            seen[key] = line
            out[loc + (key,)] = (file, line)
            _walk(value_node, loc + (key,), file, out, issues, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[loc + (i,)] = (file, item.start_mark.line + 1)
            _walk(item, loc + (i,), file, out, issues, budget)


def read_yaml(text: str, display: str) -> tuple[object, SourceMap]:
    """Parse YAML text (a spec file's, or a command-line value's) with a spec file's bounds: the
    safe loader, no tags, at most MAX_NODES values after aliases, nesting to MAX_DEPTH; duplicate
    keys are errors. Returns the data and where each key came from; every failure is a
    `SpecError` naming `display`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise user_error(
            f"YAML tags are not allowed in a spec: {exc.problem}",
            file=display,
            line=mark.line + 1 if mark else None,
            hint="a spec holds plain values (numbers, strings, lists, mappings); remove the `!` tag",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        if exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            problem += f" (in what starts on line {exc.context_mark.line + 1})"
        raise user_error(
            f"YAML syntax error: {problem}",
            file=display,
            line=line,
            hint="check indentation, colons and brackets around this line",
        ) from None
    except yaml.YAMLError as exc:
        raise user_error(f"YAML error: {exc}", file=display) from None
    except RecursionError:
        raise user_error(f"nested too deeply (more than {MAX_DEPTH} levels)", file=display) from None
    sources = SourceMap({(): (display, 1)})
    issues: list[Issue] = []
    if root is not None:
        _walk(root, (), display, sources, issues, _Budget(display))
    if issues:
        raise SpecError(issues)
    return data, sources


def load_yaml_mapping(path: Path, display: str | None = None) -> tuple[dict, SourceMap]:
    """Read a YAML file that must hold one mapping; every failure is a `SpecError`."""
    display = display or str(path)
    path = Path(path)
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise user_error(f"is {what}, not a spec file", file=display)
    if path.exists() and path.stat().st_size > MAX_SPEC_BYTES:
        raise user_error(
            f"is {path.stat().st_size:,} bytes; a spec may have at most {MAX_SPEC_BYTES:,}",
            file=display,
            hint="a spec describes a model in a few KB; is this the right file?",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise user_error(
            "file not found",
            file=display,
            hint="give a spec name from specs/ (e.g. spec=biggan_deep_256) or a path to a .yaml file",
        ) from None
    except IsADirectoryError:
        raise user_error("is a directory, not a spec file", file=display) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(f"cannot read the file: {exc}", file=display) from None
    data, sources = read_yaml(text, display)
    if data is None:
        raise user_error(
            "the file is empty",
            file=display,
            hint="a spec is a YAML mapping with sections such as generator:, discriminator:, data:",
        )
    if not isinstance(data, dict):
        raise user_error(
            f"the document is a {type(data).__name__}, not a mapping",
            file=display,
            line=1,
            hint="a spec is a YAML mapping with sections such as generator:, discriminator:, data:",
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise user_error(f"top-level keys must be strings, got {bad_keys!r}", file=display)
    return data, sources
