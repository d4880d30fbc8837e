"""`schema`: the JSON Schema written to a file (or printed), and docs/spec-reference.md, the
reference generated from it, kept current."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.blocks import REGISTRY as BLOCKS
from pipeline.methods import METHODS
from pipeline.spec import Spec
from pipeline.spec.reference import REGENERATE, schema_markdown


def test_the_checked_in_reference_is_current(root):
    current = schema_markdown(Spec)
    checked_in = (root / "docs" / "spec-reference.md").read_text(encoding="utf-8")
    assert checked_in == current, f"docs/spec-reference.md is not current: regenerate it with `{REGENERATE}`"


def test_the_reference_has_every_method_block_section_and_field():
    text = schema_markdown(Spec)
    for kind in METHODS:
        assert f"### `{kind}` (" in text, kind
    for kind in BLOCKS:
        assert f"### `{kind}` (" in text, kind
    schema = Spec.model_json_schema()
    for name, model in schema["$defs"].items():
        assert f'<a id="{name.lower()}"></a>' in text, name
        for field in model.get("properties", {}):
            assert f"| `{field}` |" in text, (name, field)


def test_reference_rows_say_type_default_and_description():
    text = schema_markdown(Spec)
    # a plain default, a bound, a default made by a factory, and a union of a model with null
    max_steps = "| `max_steps` | integer (> 0) | `100000` | Steps of the run (each: every phase of the method once). |"
    assert max_steps in text
    assert '| `g_opt` | [OptimizerSpec](#optimizerspec) | `{"kind": "adam", "lr": 0.0001}`, other fields' in text
    assert "| `latent` | [LatentSpec](#latentspec) or null | `null` |" in text
    # an enum in a table cell: its bars escaped, so the row keeps four columns
    row = next(line for line in text.splitlines() if line.startswith("| `precision` |"))
    assert row.replace("\\|", "").count("|") == 5, row


def test_schema_writes_a_file_by_default_and_prints_with_stdout(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("schema")
    assert result.code == 0 and result.out == ""
    assert "spec.schema.json" in result.err
    written = json.loads((tmp_path / "spec.schema.json").read_text())
    assert written == Spec.model_json_schema()
    for argv in (["schema", "--stdout"], ["schema", "-"]):
        result = cli(*argv)
        assert result.code == 0 and json.loads(result.out) == written
    result = cli("schema", "--markdown", "ref.md")
    assert result.code == 0 and (tmp_path / "ref.md").read_text() == schema_markdown(Spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.md", "spec.schema.json"]


def test_a_closed_pipe_ends_schema_without_a_traceback(root, clean_env):
    # `schema --stdout | head -c 100`: the reader goes away after 100 bytes
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "schema", "--stdout"],
        cwd=root,
        env=clean_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100).startswith(b"{")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
