"""`key=value` overrides: typed like the spec, checked against the schema and the node names."""

import json

import pytest

from pipeline.errors import SpecError
from pipeline.spec import load_spec


def test_overrides_set_typed_values():
    spec = load_spec(
        "tiny_biggan",
        [
            "train.max_steps=7",
            "compile.enabled=true",
            "train.g_opt.betas=[0.5, 0.9]",
            "generator.nodes.up_8.out_channels=96",
        ],
    ).spec
    assert spec.train.max_steps == 7 and spec.compile.enabled
    assert spec.train.g_opt.betas == (0.5, 0.9)
    assert spec.generator.nodes["up_8"].out_channels == 96


def test_override_creates_a_default_section():
    # demo.yaml has no compile: section; the schema has one
    assert load_spec("demo", ["compile.mode=max-autotune"]).spec.compile.mode == "max-autotune"


def test_override_of_per_instance_values():
    spec = load_spec("tiny_biggan_deep", ["generator.nodes.up_from_attn.each.out_channels=[64, 16]"]).spec
    assert spec.generator.nodes["up_from_attn"].instance(1).out_channels == 16


def issues_of(spec, overrides):
    with pytest.raises(SpecError) as info:
        load_spec(spec, overrides)
    return [(i.path, i.message, i.hint or "", i.file) for i in info.value.issues]


def test_unknown_keys_suggest_close_matches():
    found = issues_of("tiny_biggan", ["train.max_step=3", "generator.nodes.up8.out_channels=3", "trian.loss=hinge"])
    assert found[0][:2] == ("train.max_step", "unknown key 'max_step'") and "'max_steps'" in found[0][2]
    assert found[1][0] == "generator.nodes.up8" and "'up_8'" in found[1][2]
    assert found[2][0] == "trian" and "'train'" in found[2][2]
    assert all(f[3] == "command line" for f in found)


def test_unknown_node_param_suggests():
    (issue,) = issues_of("tiny_biggan", ["generator.nodes.up_8.out_chanels=3"])
    assert issue[0] == "generator.nodes.up_8.out_chanels" and "'out_channels'" in issue[2]


def test_override_values_are_validated_with_the_schema_types():
    (issue,) = issues_of("tiny_biggan", ["train.max_steps=many"])
    assert issue[0] == "train.max_steps" and "valid integer" in issue[1] and issue[3] == "command line"
    (issue,) = issues_of("tiny_biggan", ["method.loss=wasserstein"])
    assert "'hinge'" in issue[1]


def test_method_options_moved_out_of_train_say_where_they_went():
    (issue,) = issues_of("tiny_biggan", ["train.loss=hinge"])
    assert issue[0] == "train.loss" and "method.loss=" in issue[2]


def test_malformed_overrides():
    (issue,) = issues_of("tiny_biggan", ["train.max_steps"])
    assert "is not key=value" in issue[1]
    (issue,) = issues_of("tiny_biggan", ["train..x=1"])
    assert "is not key=value" in issue[1]
    (issue,) = issues_of("tiny_biggan", ["train.max_steps.x=1"])
    assert issue[1] == "unknown key 'x'" and issue[2] == "this value has no sub-keys"


def test_overrides_that_break_the_graph_are_graph_errors(cli):
    result = cli("validate", "spec=tiny_biggan", "data.resolution=64", "--json")
    assert result.code == 2 and "generator outputs 3x32x32, but data.resolution 64" in result.err


def test_override_reaches_validate_json(cli):
    result = cli("validate", "spec=tiny_biggan", "generator.nodes.up_8.out_channels=96", "--json")
    assert result.code == 0, result.err
    rows = {n["name"]: n for n in json.loads(result.out)["generator"]["nodes"]}
    assert rows["up_8"]["output_shape"] == "96x8x8"
