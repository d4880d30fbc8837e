"""Every validation rule has a failing fixture whose message is asserted; user errors exit with
status 2 and print no traceback."""

from pathlib import Path

import pytest

from pipeline.spec import load

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "invalid").glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    return [
        line.removeprefix("# expect:").strip() for line in path.read_text().splitlines() if line.startswith("# expect:")
    ]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_invalid_fixture(cli, fixture):
    expected = expectations(fixture)
    assert expected, f"{fixture.name} has no '# expect:' line"
    result = cli("validate", fixture)
    assert result.code == 2, result.out
    assert "Traceback" not in result.err
    for text in expected:
        assert text in result.err, f"{text!r} not in:\n{result.err}"


def test_missing_file(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.yaml")
    assert result.code == 2
    assert "nope.yaml: file not found" in result.err


def test_unknown_spec_name_suggests(cli):
    result = cli("validate", "spec=biggan_deep256")
    assert result.code == 2
    assert "no spec named 'biggan_deep256'" in result.err and "biggan_deep_256" in result.err


def test_no_spec(cli):
    result = cli("validate")
    assert result.code == 2 and "no spec given" in result.err


def test_base_cycle(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(load, "SPECS_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    result = cli("validate", tmp_path / "a.yaml")
    assert result.code == 2
    assert "base specs form a cycle: a -> b -> a" in result.err


def test_directory_is_not_a_spec(cli, tmp_path):
    result = cli("validate", str(tmp_path) + "/")
    assert result.code == 2 and "is a directory" in result.err


def test_valid_fixture_base_resolves_inside_specs(cli, write_spec):
    # a spec outside specs/ may extend a shipped one
    path = write_spec("base: tiny_biggan\ndescription: derived\n")
    assert cli("validate", path).code == 0


def test_zero_stage_3_is_refused_with_figures_that_match_the_largest_spec(cli):
    import json

    from pipeline.spec.schema import ZERO_3_REFUSED

    result = cli("validate", "spec=demo", "train.zero_stage=3")
    assert result.code == 2 and "Traceback" not in result.err
    assert "train.zero_stage: ZeRO stage 3 is not supported" in result.err and "train.zero_stage=2" in result.err
    report = cli("validate", "spec=biggan_deep_512", "--json")
    assert report.code == 0, report.err
    networks = json.loads(report.out)
    params = networks["generator"]["params"] + networks["discriminator"]["params"]
    assert f"{params / 1e6:.1f}M parameters" in ZERO_3_REFUSED
    assert f"{params * 4 / 1e6:.0f} MB" in ZERO_3_REFUSED
