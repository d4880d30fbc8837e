"""Training methods as data: the gan method against main before methods existed, the method and
network declarations and their errors, and CSGAN (`method: cycle`) on the two-domain digits."""

from __future__ import annotations

import json
import subprocess
import sys

import gan_regression
import pytest
import torch

from pipeline.errors import SpecError
from pipeline.spec import Spec, load_spec
from pipeline.spec.schema import upgrade_stored
from pipeline.train import checkpoint, loop

FIXTURE = gan_regression.__file__.replace("gan_regression.py", "fixtures/gan_regression.json")


# ----- the gan method is what main trained before methods existed
def test_gan_method_trains_bitwise_as_main_did(demo_shards, tmp_path):
    with open(FIXTURE) as f:
        recorded = json.load(f)
    if recorded["machine"] != gan_regression.machine():
        pytest.skip(f"recorded on {recorded['machine']}, this machine is {gan_regression.machine()}: kernels differ")
    for name, expected in recorded["cases"].items():
        got = gan_regression.run_case(name, demo_shards, tmp_path / name)
        assert (got["G"], got["D"], got["EMA"]) == (expected["G"], expected["D"], expected["EMA"]), name
        if name == "plain":  # one value per phase: the logged means are the values main logged
            assert got["losses"] == expected["losses"]


# ----- declarations and their errors
def issues(spec: str, overrides: list[str]) -> list:
    with pytest.raises(SpecError) as info:
        load_spec(spec, overrides)
    return info.value.issues


def test_an_unknown_method_or_option_names_the_close_match():
    (issue,) = issues("tiny_biggan", ["method.kind=cylce"])
    assert issue.path == "method" and "unknown method 'cylce'" in issue.message and "'cycle'" in issue.hint
    (issue,) = issues("tiny_biggan", ["method.d_step=2"])
    assert issue.path == "method.d_step" and "'d_steps'" in issue.hint


def test_an_override_of_one_aliased_network_leaves_the_other_as_it_was():
    spec = load_spec("csgan_demo", ["networks.G_AB.nodes.stem.out_channels=8"]).spec  # G_BA: *resnet_generator
    assert spec.networks["G_AB"].nodes["stem"].out_channels == 8
    assert spec.networks["G_BA"].nodes["stem"].out_channels == 16


def test_a_method_option_naming_an_unknown_network_is_an_error(cli):
    result = cli("validate", "csgan_demo", "method.g_ab=G_XY")
    assert result.code == 2
    assert "method.g_ab: method 'cycle' trains a network 'G_XY', which the spec does not declare" in result.err


def test_a_declared_network_the_method_does_not_train_is_an_error(write_spec):
    path = write_spec("base: csgan_demo\nmethod: {g_ab: G_BA}\n")
    found = issues(str(path), [])
    assert any(i.path == "networks.G_AB" and "not trained by method 'cycle'" in i.message for i in found)


def test_a_cycle_spec_without_its_streams_is_an_error(write_spec):
    path = write_spec("base: csgan_demo\ndata: {streams: {a: null, c: {shards: x}}}\n")
    found = issues(str(path), [])
    assert any("reads a data stream 'a'" in i.message for i in found), found


def test_a_translation_that_does_not_fit_the_other_domain_is_an_error(write_spec):
    path = write_spec("base: csgan_demo\nnetworks: {G_AB: {nodes: {up_2: null, rgb: {in: up_1}}}}\n")
    found = issues(str(path), [])
    (issue,) = [i for i in found if "G_AB outputs" in i.message]
    assert issue.path == "networks.G_AB.output" and "3x16x16" in issue.message and "3x32x32" in issue.message


def test_the_synthesized_loss_needs_paired_streams():
    (issue,) = issues("csgan_demo", ["method.paired=false"])
    assert issue.path == "method" and "lambda_cs" in issue.message and "unpaired" in issue.message
    load_spec("csgan_demo", ["method.paired=false", "method.lambda_cs=0"])  # CycleGAN


def test_stored_specs_of_older_runs_are_read_in_todays_layout():
    current = load_spec("demo", ["method.d_steps=2"]).spec.resolved()  # not the default: it must carry over
    old = dict(current)
    method = old.pop("method")
    old["train"] = old["train"] | {"loss": method["loss"], "d_steps": method["d_steps"]}
    upgraded = upgrade_stored(old)
    assert upgraded["method"] == {"kind": "gan", "loss": "hinge", "d_steps": 2}
    assert Spec.model_validate(upgraded).method.d_steps == 2
    assert checkpoint.spec_differences(old, current) == []


def test_the_json_schema_documents_every_method_option():
    schema = json.dumps(Spec.model_json_schema())
    for option in ("lambda_cs", "lambda_cycle", "history", "paired", "d_steps", "r1_gamma"):
        assert f'"{option}"' in schema, option
    methods = Spec.model_json_schema()["$defs"]
    for name in ("CycleMethod", "GanMethod"):
        fields = methods[name]["properties"]
        assert all("description" in f for k, f in fields.items() if k != "kind"), name


# ----- CSGAN on the two-domain digits
@pytest.fixture(scope="session")
def domain_shards(tmp_path_factory):
    from pipeline.eval.classifier import build_domain_demo

    out = tmp_path_factory.mktemp("digits-ab")
    build_domain_demo(out)
    return out


def cycle_overrides(domain_shards, run_dir, *extra):
    return [
        f"data.streams.a.shards={domain_shards / 'a'}",
        f"data.streams.b.shards={domain_shards / 'b'}",
        f"run.dir={run_dir}",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=2",
        "train.checkpoint_every=2",
        "eval.every=0",
        "method.history=3",  # full after one step: later steps draw from it
        *extra,
    ]


def test_paired_streams_are_read_as_pairs(domain_shards):
    from pipeline.data.dali import loader_from_spec

    spec = load_spec("csgan_demo", cycle_overrides(domain_shards, "unused", "data.num_classes=10")).spec
    a, b = (loader_from_spec(spec, stream=s, batch_size=16, seed_offset=0) for s in ("a", "b"))
    for _ in range(3):
        (_, labels_a), (_, labels_b) = next(a), next(b)
        assert torch.equal(labels_a, labels_b)


def test_csgan_trains_samples_exports_and_resumes_exactly(domain_shards, tmp_path, metrics):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    loop.train(load_spec("csgan_demo", cycle_overrides(domain_shards, straight, "train.max_steps=4")))
    rows = metrics(straight)
    assert [r["images_seen"] for r in rows] == [8, 16, 24, 32]  # a and b, 4 each per step
    assert all({"loss_g", "loss_cycle", "loss_cs", "loss_d_a", "loss_d_b", "grad_norm_g"} <= set(r) for r in rows)
    assert sorted(p.name for p in (straight / "export").iterdir()) == [
        "G_AB.safetensors",
        "G_BA.safetensors",
        "spec.yaml",
    ]
    last = checkpoint.latest(straight)
    assert sorted(p.name for p in last.iterdir() if p.is_dir()) == ["D_A", "D_B", "G"]
    assert checkpoint.network_weights(last, "G_BA").keys() == checkpoint.network_weights(last, "G_AB").keys()
    assert (straight / "samples" / "step-00000004.png").exists()

    loop.train(load_spec("csgan_demo", cycle_overrides(domain_shards, broken, "train.max_steps=4")), stop_after=3)
    loop.train(load_spec("csgan_demo", cycle_overrides(domain_shards, broken, "train.max_steps=4")))
    keys = ("loss_g", "loss_cycle", "loss_d_a", "loss_d_b", "images_seen")
    assert [[r[k] for k in keys] for r in metrics(broken)] == [[r[k] for k in keys] for r in rows]


def test_csgan_sample_and_eval_commands(cli, domain_shards, tmp_path):
    run_dir = tmp_path / "run"
    loop.train(load_spec("csgan_demo", cycle_overrides(domain_shards, run_dir, "train.max_steps=1")))
    result = cli("sample", run_dir, "--num", "4", "--out", tmp_path / "grid")
    assert result.code == 0, result.err
    from PIL import Image

    width, height = Image.open(tmp_path / "grid" / "a_to_b.png").size  # rows input | translated | cycled, labelled
    assert height == 3 * 32 + 2 * 2 and width > 4 * 32 + 3 * 2
    result = cli("eval", run_dir, "--num", "100", "--json", "--out", tmp_path / "eval")
    assert result.code == 0, result.err
    scores = json.loads(result.out)
    for direction in ("A->B", "B->A"):
        assert scores[direction]["fid"] > 0 and 0 <= scores[direction]["content_accuracy"] <= 1


@pytest.mark.integration
def test_flops_follow_the_cycle_phases(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.profile.flops import step_flops

    synthetic = ["data.streams.a.shards=null", "data.streams.b.shards=null"]
    synthetic += ["data.streams.a.synthetic=true", "data.streams.b.synthetic=true"]
    loaded = load_spec("csgan_demo", [*synthetic, "train.batch_size=2", f"run.dir={tmp_path}"])
    trainer = loop.Trainer(loaded, resume=False)
    trainer.run_step()
    with FlopCounterMode(display=False) as counter:
        trainer.run_step()
    planned = step_flops(loaded, trainer.micro, trainer.accum)
    assert sum(v for k, v in planned.items() if k != "sn") == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert {"G_fwd", "D_fwd", "G_bwd", "D_A_bwd", "D_B_bwd"} <= set(planned)


@pytest.mark.slow
def test_csgan_on_two_ranks_and_after_sigkill(domain_shards, tmp_path, root, clean_env, metrics):
    from helpers import PATIENCE_S, wait_for_steps

    killed, stderr_path = tmp_path / "killed", tmp_path / "stderr.txt"
    args = cycle_overrides(domain_shards, killed, "train.max_steps=6", "train.batch_size=4")
    command = [sys.executable, "-m", "pipeline", "train", "spec=csgan_demo", *args]
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, cwd=root, env=clean_env, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_steps(proc, killed, 3, stderr_path)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(command, cwd=root, env=clean_env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    loop.train(load_spec("csgan_demo", cycle_overrides(domain_shards, tmp_path / "straight", "train.max_steps=6")))
    keys = ("loss_g", "loss_d_a", "loss_d_b")
    assert [[r[k] for k in keys] for r in metrics(killed)] == [
        [r[k] for k in keys] for r in metrics(tmp_path / "straight")
    ]

    two = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "spec=csgan_demo", "procs=2",
         *cycle_overrides(domain_shards, tmp_path / "two", "train.max_steps=2")],
        cwd=root, env=clean_env, capture_output=True, text=True, timeout=PATIENCE_S,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    rows = metrics(tmp_path / "two")
    assert [r["images_seen"] for r in rows] == [8, 16] and all(torch.isfinite(torch.tensor(r["loss_g"])) for r in rows)
