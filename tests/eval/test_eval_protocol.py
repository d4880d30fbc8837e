"""The evaluation protocol: the spellings that turn evaluation during training off, one protocol
for `train`, `eval` and `sample` (so the same weights get the same scores), and `eval` results
filed under their protocol."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.errors import SpecError
from pipeline.eval.protocol import STANDING_STATS_PASSES, protocol_tag
from pipeline.spec import Spec, load_spec
from pipeline.spec.load import SPECS_DIR
from pipeline.spec.schema import EvalSpec

FAST_INIT = ["generator.init=normal", "discriminator.init=normal"]  # orthogonal init's QR costs seconds on a CPU


# ----- turning evaluation off -----
def demo_with_eval(text: str) -> str:
    """specs/demo.yaml with its `eval:` line replaced by TEXT."""
    demo = (SPECS_DIR / "demo.yaml").read_text()
    assert re.search(r"^eval: \{every: [1-9]", demo, flags=re.M)  # the demo evaluates: what TEXT turns off
    return re.sub(r"^eval:.*$", text, demo, count=1, flags=re.M)


def test_the_demo_evaluates_during_training():
    assert load_spec("demo", check_graphs=False).spec.eval.every > 0


@pytest.mark.parametrize("override", ["eval.every=0", "eval.every=null", "eval=null"])
def test_each_spelling_of_off_on_the_command_line(override):
    spec = load_spec("demo", [override]).spec
    assert spec.eval.every == 0
    assert spec.eval.standing_stats == STANDING_STATS_PASSES  # the rest of the section is the defaults


@pytest.mark.parametrize("text", ["eval: null", "eval: {every: null}", "eval: {every: 0}"])
def test_each_spelling_of_off_in_a_spec_and_in_a_derived_spec(write_spec, text):
    assert load_spec(write_spec(demo_with_eval(text), "standalone.yaml")).spec.eval.every == 0
    # a derived spec: `eval: null` must not remove the section and so bring back a default
    assert load_spec(write_spec(f"base: demo\n{text}\n", "derived.yaml")).spec.eval.every == 0


def test_null_in_a_derived_spec_means_what_it_means_without_a_base(write_spec):
    derived = load_spec(write_spec("base: demo\ntrain: {ema: null}\ndata: {augment: null}\n")).spec
    assert derived.train.ema is None  # no EMA, as `ema: null` in a spec without a base
    assert derived.data.augment.flip is True  # where null has no meaning it still removes: the default


def test_a_negative_interval_is_an_error_naming_eval_every(write_spec):
    with pytest.raises(SpecError) as info:
        load_spec("demo", ["eval.every=-1"])
    (issue,) = info.value.issues
    assert issue.path == "eval.every" and issue.file == "command line" and "greater than or equal to 0" in issue.message
    with pytest.raises(SpecError) as info:
        load_spec(write_spec("base: demo\neval:\n  every: -5\n"))
    (issue,) = info.value.issues
    assert issue.path == "eval.every" and issue.file.endswith("spec.yaml") and issue.line == 3


def test_the_schema_documents_zero_as_off():
    every = Spec.model_json_schema()["$defs"]["EvalSpec"]["properties"]["every"]
    assert every["default"] == 0 and every["minimum"] == 0 and "0: never" in every["description"]


@pytest.mark.integration
def test_training_with_evaluation_off_does_not_evaluate(tmp_path, metrics):
    """Synthetic data has no real images to compare with: an evaluation would stop the run."""
    from pipeline.train.loop import train

    run_dir = tmp_path / "run"
    overrides = [*FAST_INIT, "data.synthetic=true", f"run.dir={run_dir}", "train.batch_size=4", "train.max_steps=1"]
    train(load_spec("tiny_biggan", [*overrides, "train.log_every=1", "eval.every=0"]))
    rows = metrics(run_dir)
    assert rows and not [r for r in rows if "fid" in r]


# ----- one protocol for train, eval and sample -----
@pytest.fixture(scope="module")
def protocol_run(demo_shards_with_classifier, tmp_path_factory):
    """A 2-step demo run scored at steps 0 and 2 with a protocol unlike every default: 2 standing
    passes, truncation 0.8, 40 samples, seed 3."""
    from pipeline.eval.during_training import evaluator_for
    from pipeline.train.loop import train

    run_dir = tmp_path_factory.mktemp("protocol") / "run"
    loaded = load_spec(
        "demo",
        [
            *FAST_INIT,
            f"data.shards={demo_shards_with_classifier}",
            f"run.dir={run_dir}",
            "seed=3",
            "train.batch_size=16",
            "train.max_steps=2",
            "train.log_every=1",
            "train.sample_every=2",
            "train.checkpoint_every=2",
            "eval.every=2",
            "eval.num_samples=40",
            "eval.truncation=0.8",
            "eval.standing_stats=2",
        ],
    )
    train(loaded, evaluate=evaluator_for(loaded.spec))
    return run_dir


def test_one_default_number_of_standing_passes():
    assert STANDING_STATS_PASSES == 16  # BigGAN's sampling protocol, as BENCHMARKS.md's demo numbers use it
    assert EvalSpec().standing_stats == STANDING_STATS_PASSES
    assert load_spec("demo", check_graphs=False).spec.eval.standing_stats == STANDING_STATS_PASSES


def test_eval_without_options_scores_with_the_protocol_and_the_scores_of_training(cli, protocol_run, metrics, tmp_path):
    trained = [r for r in metrics(protocol_run) if "fid" in r][-1]
    assert trained["step"] == 2
    result = cli("eval", protocol_run, "--out", tmp_path, "--json")
    assert result.code == 0, result.err
    (scored,) = json.loads(result.out)["results"]
    protocol = scored["protocol"]
    assert (protocol["standing_stats_passes"], protocol["truncation"], protocol["num_samples"]) == (2, 0.8, 40)
    assert protocol["latent_seed"] == 3 and protocol["ema"] is True and protocol["step"] == 2
    # training recorded the same protocol, key for key; eval adds which weights it read
    assert {k: protocol[k] for k in trained["eval_protocol"]} == trained["eval_protocol"]
    assert set(protocol) - set(trained["eval_protocol"]) == {"generator", "step"}
    assert scored["fid"] == pytest.approx(trained["fid"], rel=1e-4)
    assert scored["is_mean"] == pytest.approx(trained["is_mean"], rel=1e-4)


def test_sample_takes_the_specs_passes_else_the_one_default(cli, protocol_run, tmp_path):
    small = ["--num", "1", "--classes", "0,1", "--batch-size", "4"]
    assert cli("sample", protocol_run, "--out", tmp_path / "run", *small).code == 0
    record = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert record["standing_stats"]["num_passes"] == 2 and record["ema"] is True and record["truncation"] is None
    # exported weights whose spec does not say how many passes
    export = tmp_path / "export"
    shutil.copytree(protocol_run / "export", export)
    spec = yaml.safe_load((export / "spec.yaml").read_text())
    del spec["eval"]["standing_stats"]
    (export / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = cli("sample", export, "--out", tmp_path / "export-samples", *small)
    assert result.code == 0, result.err
    assert f"standing statistics: {STANDING_STATS_PASSES} passes" in result.out
    record = json.loads((tmp_path / "export-samples" / "samples.json").read_text())
    assert record["standing_stats"]["num_passes"] == STANDING_STATS_PASSES
    # a flag still wins
    assert cli("sample", export, "--out", tmp_path / "off", "--standing-stats", "0", *small).code == 0
    assert json.loads((tmp_path / "off" / "samples.json").read_text())["standing_stats"] is None


# ----- eval results filed by protocol -----
def test_each_protocol_has_its_own_json_and_plot(cli, protocol_run, tmp_path):
    def run_eval(*options) -> tuple[Path, Path | None]:
        result = cli("eval", protocol_run, "--out", tmp_path, "--num", "20", *options)
        assert result.code == 0, result.err
        written = re.search(r"^written to (\S+\.json)(?: and (\S+\.png))?$", result.out, flags=re.M)
        assert written, result.out
        json_file, plot = written.groups()
        return Path(json_file), plot and Path(plot)

    sweep = run_eval("--truncation", "0.5,none", "--standing-stats", "1")
    single = run_eval("--truncation", "0.5", "--standing-stats", "1")
    other_sweep = run_eval("--truncation", "0.5,none", "--standing-stats", "0")
    assert single[1] is None  # one truncation: no sweep to plot
    files = {sweep[0], sweep[1], single[0], other_sweep[0], other_sweep[1]}
    assert len(files) == 5 and {p for p in tmp_path.iterdir()} == files
    for json_file, plot, passes, truncations in [
        (*sweep, 1, [0.5, None]),
        (*single, 1, [0.5]),
        (*other_sweep, 0, [0.5, None]),
    ]:
        record = json.loads(json_file.read_text())
        assert record["json"] == str(json_file) and record.get("plot") == (plot and str(plot))
        assert [r["protocol"]["truncation"] for r in record["results"]] == truncations
        assert {r["protocol"]["standing_stats_passes"] for r in record["results"]} == {passes}
        assert json_file.name == f"step-00000002-{protocol_tag(record['results'])}.json"
        assert plot is None or plot.name == f"{json_file.stem}-fid-is.png"
    # the same protocol again writes its own files again, and no others
    before = json.loads(sweep[0].read_text())
    assert run_eval("--truncation", "0.5,none", "--standing-stats", "1") == sweep
    assert {p for p in tmp_path.iterdir()} == files
    assert json.loads(sweep[0].read_text())["results"] == before["results"]
