"""Property test: random mutations of valid specs never crash `validate` with a traceback; the CLI
either accepts the spec (exit 0) or explains what is wrong (exit 2)."""

import contextlib
import io

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.blocks import REGISTRY
from pipeline.cli import main
from pipeline.spec.load import SPECS_DIR, _load_with_bases

# Fully merged valid specs (without `base:`, so that nothing is merged again) to mutate.
BASES = {
    name: {k: v for k, v in _load_with_bases(SPECS_DIR / f"{name}.yaml")[0].items() if k != "base"}
    for name in ("tiny_biggan", "tiny_biggan_deep", "dcgan_32")
}
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "x", "h", "zs.1", "zs.9", "cond", "image", "y", "z", "up_8", "a.b.c", "-1", "[1"]),
    st.sampled_from(sorted(REGISTRY)),
    st.lists(st.integers(-2, 300), max_size=5),
    st.lists(st.sampled_from(["h", "shared", "zs.1", "cond", "nope"]), max_size=3),
    st.fixed_dictionaries({"kind": st.sampled_from(sorted(REGISTRY)), "in": st.sampled_from(["h", "z", "image"])}),
    st.just({}),
)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


def mutate(doc, path, op, value):
    if not path:
        return
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[f"{key}_x"] = parent.pop(key)
    elif op == "add" and isinstance(parent, dict):
        parent[f"extra_{key}"] = value
    else:
        parent[key] = value


def run_cli(*argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def test_unmutated_bases_are_valid(tmp_path):
    for name, doc in BASES.items():
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(doc))
        assert run_cli("validate", str(spec), "--json")[0] == 0, name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
def test_mutated_specs_never_crash(tmp_path_factory, data, base):
    doc = yaml.safe_load(yaml.safe_dump(BASES[base]))
    for _ in range(data.draw(st.integers(1, 3))):
        all_paths = list(paths(doc))
        path = data.draw(st.sampled_from(all_paths))
        op = data.draw(st.sampled_from(["delete", "replace", "rename", "add"]))
        mutate(doc, path, op, data.draw(VALUES))
    spec = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    code, err = run_cli("validate", str(spec), "--json")
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ")


@settings(max_examples=30, deadline=None)
@given(
    text=st.sampled_from(sorted(BASES)).map(lambda b: yaml.safe_dump(BASES[b], sort_keys=False)),
    cut=st.tuples(st.integers(0, 4000), st.integers(0, 200)),
    junk=st.text(max_size=8),
)
def test_corrupted_yaml_text_never_crashes(tmp_path_factory, text, cut, junk):
    start, length = cut
    spec = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    spec.write_text(text[:start] + junk + text[start + length :])
    code, err = run_cli("validate", str(spec), "--json")
    assert code in (0, 2) and "Traceback" not in err


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(
        [
            "train.max_steps",
            "generator.nodes.up_8.out_channels",
            "data.resolution",
            "compile",
            "generator.nodes.attn.resolution",
            "discriminator.sn",
            "latent",
            "generator.nodes.new.kind",
            "generator.nodes",
            "x.y.z",
            "generator.output",
        ]
    ),
    value=st.sampled_from(["3", "-1", "[1, 2]", "{a: 1}", "null", "true", "abc", "", "zs.1", "[", "1e400"]),
)
def test_random_overrides_never_crash(key, value):
    code, err = run_cli("validate", "tiny_biggan", f"{key}={value}", "--json")
    assert code in (0, 2) and "Traceback" not in err
