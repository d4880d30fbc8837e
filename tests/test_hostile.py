"""Hostile and damaged run directories: nothing read back from a checkpoint can run code, and a
file that cannot be read is refused by name."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from pipeline.errors import SpecError
from pipeline.safe_files import sha256
from pipeline.spec import load_spec
from pipeline.train import checkpoint, loop
from pipeline.train.checkpoint import CHECKSUMS

# DeepSpeed writes these into each engine directory and never reads them back on resume (the tag
# is given, and its helper scripts are for people); everything else in a checkpoint is read.
NOT_READ = {"latest", "zero_to_fp32.py", "zero_to_torch.py"}


class Payload:
    """A pickle whose loading creates the file `marker` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def overrides(demo_shards, run_dir, max_steps):
    return [
        f"data.shards={demo_shards}",
        f"run.dir={run_dir}",
        f"train.max_steps={max_steps}",
        "train.batch_size=8",
        "train.zero_stage=1",  # ZeRO optimizer partitions: the files with DeepSpeed's own classes
        "eval.every=0",
    ]


@pytest.fixture(scope="module")
def one_step_run(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    loop.train(load_spec("demo", overrides(demo_shards, run_dir, 1)))
    return run_dir


@pytest.mark.slow
def test_a_planted_pickle_in_any_checkpoint_file_never_runs(one_step_run, demo_shards, tmp_path):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the control: an ordinary unpickler does run it
    assert marker.exists()
    marker.unlink()

    files = sorted(
        p.relative_to(one_step_run)
        for p in (one_step_run / "checkpoints").rglob("*")
        if p.is_file() and p.name != CHECKSUMS
    )
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for i, file in enumerate(files):
        run_dir = tmp_path / f"run{i}"
        shutil.copytree(one_step_run, run_dir)
        (run_dir / file).write_bytes(payload)
        # an attacker rewrites the checksums too: the loaders themselves must refuse
        ckpt = run_dir / file.parts[0] / file.parts[1]
        sums = json.loads((ckpt / CHECKSUMS).read_text())
        sums[str(file.relative_to(file.parts[0], file.parts[1]))] = sha256(run_dir / file)
        (ckpt / CHECKSUMS).write_text(json.dumps(sums))
        resume = load_spec("demo", overrides(demo_shards, run_dir, 2))
        if file.name in NOT_READ:
            loop.train(resume)
        else:
            with pytest.raises(SpecError) as info:
                loop.train(resume)
            assert str(run_dir / file) in str(info.value), (file, str(info.value))
        assert not marker.exists(), f"the payload in {file} ran"


@pytest.mark.slow
def test_damaged_checkpoint_files_are_refused_by_name(one_step_run, demo_shards, tmp_path):
    step = "checkpoints/step-00000001"
    cases = {
        f"{step}/G/ckpt/mp_rank_00_model_states.pt": lambda b: b[: len(b) // 2],  # truncated
        f"{step}/ema-generator.safetensors": lambda b: b[: len(b) // 2],
        f"{step}/rank-00000.pt": lambda b: b"",
        f"{step}/state.json": lambda b: b"{not json",
    }
    for i, (name, damage) in enumerate(cases.items()):
        run_dir = tmp_path / f"run{i}"
        shutil.copytree(one_step_run, run_dir)
        (run_dir / name).write_bytes(damage((run_dir / name).read_bytes()))
        with pytest.raises(SpecError) as info:
            loop.train(load_spec("demo", overrides(demo_shards, run_dir, 2)))
        assert f"no intact checkpoint to resume from: {run_dir / name} differs" in str(info.value), str(info.value)
        # and the readers themselves, for a checkpoint without checksums (written before them)
        (run_dir / step / CHECKSUMS).unlink()
        with pytest.raises(SpecError) as info:
            loop.train(load_spec("demo", overrides(demo_shards, run_dir, 2)))
        assert f"cannot read {run_dir / name}" in str(info.value), str(info.value)


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(demo_shards, tmp_path, capsys, metrics):
    run_dir = tmp_path / "run"
    loop.train(
        load_spec("demo", overrides(demo_shards, run_dir, 2) + ["train.checkpoint_every=1", "train.log_every=1"])
    )
    newest = run_dir / "checkpoints" / "step-00000002"
    flipped = newest / "D" / "ckpt" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    flipped.write_bytes(bytes(data))
    loop.train(
        load_spec("demo", overrides(demo_shards, run_dir, 3) + ["train.checkpoint_every=1", "train.log_every=1"])
    )
    said = capsys.readouterr().err
    assert f"skipping a damaged checkpoint: {flipped} differs" in said and "step-00000001" in said
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]  # step 2 redone from step 1
    assert checkpoint.damage(newest) is None  # rewritten whole when step 2 was redone


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(demo_shards, tmp_path, monkeypatch, capsys, metrics):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = {"pid": owner.pid, "host": socket.gethostname(), "since": "earlier"}
        (run_dir / "LOCK").write_text(json.dumps(lock))
        with monkeypatch.context() as m:
            m.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("built a trainer for a locked run"))
            with pytest.raises(SpecError, match=f"is being trained by process {owner.pid} on "):
                loop.train(load_spec("demo", overrides(demo_shards, run_dir, 1)))
        assert json.loads((run_dir / "LOCK").read_text()) == lock  # the owner's lock is untouched
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone now: its lock is stale, taken over with a warning, and released at the end
    loop.train(load_spec("demo", overrides(demo_shards, run_dir, 1)))
    assert f"taking over {run_dir / 'LOCK'}: its owner, process {owner.pid}" in capsys.readouterr().err
    assert not (run_dir / "LOCK").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1]


def test_a_lock_whose_pid_was_reused_is_stale_and_the_warning_says_how_far_the_run_got(
    demo_shards, tmp_path, capsys, metrics
):
    # killed (e.g. by the out-of-memory killer) mid fade-in; its PID now belongs to a younger process (this one)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": "earlier", "started": "1"}
    (run_dir / "LOCK").write_text(json.dumps(lock))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "resolution": 16, "phase": "fade"}) + "\n")
    loop.train(load_spec("demo", overrides(demo_shards, run_dir, 1)))
    said = capsys.readouterr().err
    assert f"its owner, process {os.getpid()} (since earlier), is no longer running" in said
    assert "after its last logged step, 7 (resolution 16, phase fade)" in said and "out-of-memory killer" in said
    assert [r["step"] for r in metrics(run_dir)] == [1] and not (run_dir / "LOCK").exists()


def test_a_partial_last_metrics_line_is_dropped_on_resume(one_step_run, demo_shards, tmp_path, capsys, metrics):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss_d": 0.')  # a crash or a full disk mid-append
    loop.train(load_spec("demo", overrides(demo_shards, run_dir, 2)))
    assert "metrics.jsonl:2: dropping a partial last line" in capsys.readouterr().err
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]

    broken = tmp_path / "broken"
    shutil.copytree(one_step_run, broken)
    lines = (broken / "metrics.jsonl").read_text()
    (broken / "metrics.jsonl").write_text("garbage\n" + lines)
    with pytest.raises(SpecError, match="line 1 is not a metrics record"):
        loop.train(load_spec("demo", overrides(demo_shards, broken, 2)))


@pytest.mark.parametrize(
    "spec, override, path",
    [
        ("demo", "train.g_opt.lr=.inf", "train.g_opt.lr"),
        ("demo", "train.d_opt.eps=.nan", "train.d_opt.eps"),
        ("demo", "train.g_opt.betas=[2.0, 0.999]", "train.g_opt.betas.0"),
        ("demo", "train.d_opt.betas=[0.0, 1.0]", "train.d_opt.betas.1"),
        ("demo", "method.ortho_reg=.inf", "method.ortho_reg"),
        ("demo", "method.r1_gamma=.nan", "method.r1_gamma"),
        ("demo", "method.gp_weight=.inf", "method.gp_weight"),
        ("demo", "generator.bn_eps=.inf", "generator.bn_eps"),
        ("demo", "eval.truncation=.nan", "eval.truncation"),
        ("demo", "seed=-1", "seed"),
        ("demo", "seed=18446744073709551616", "seed"),
        ("demo", "train.batch_size=true", "train.batch_size"),  # was read as batch 1
        ("demo", "train.zero_stage=true", "train.zero_stage"),
        ("demo", "data.resolution=1000000000", "data.resolution"),  # was a storage overflow in the analysis
        # the options the fidelity work added, and booleans inside method options and number lists
        ("csgan_demo", "method.lr_decay={constant_images: true, decay_images: 10}", "method.lr_decay.constant_images"),
        ("csgan_demo", "method.lr_decay={constant_images: 10, decay_images: 0}", "method.lr_decay.decay_images"),
        ("csgan_demo", "method.lr_decay={constant_images: .inf, decay_images: 10}", "method.lr_decay.constant_images"),
        ("csgan_demo", "method.lr_decay={constant_images: -5, decay_images: 10}", "method.lr_decay.constant_images"),
        ("csgan_demo", "method.lr_decay={decay_images: 10}", "method.lr_decay.constant_images"),
        ("demo", "data.augment.load_size=true", "data.augment.load_size"),
        ("demo", "data.augment.load_size=.nan", "data.augment.load_size"),
        ("demo", "data.augment.load_size=100000", "data.augment.load_size"),
        ("demo", "data.augment.load_size=16", "data"),  # smaller than the resolution: the crop cannot fit
        ("demo", "data.augment={crop: random_resized, load_size: 40}", "data.augment"),
        ("demo_unet", "method.cutmix.box=diagonal", "method.cutmix.box"),
        ("demo_unet", "method.cutmix.full_batch=2", "method.cutmix.full_batch"),
        ("demo_unet", "method.cutmix.warmup_images=true", "method.cutmix.warmup_images"),
        ("demo", "method.instance_noise={std: true, anneal_images: 10}", "method.instance_noise.std"),
        (
            "demo",
            "method.instance_noise={std: 0.1, anneal_images: 10, in_g_step: 3}",
            "method.instance_noise.in_g_step",
        ),
        ("progan_demo", "method.reset_optimizer=sometimes", "method.reset_optimizer"),
        ("progan_demo", "method.resolutions={true: {batch_size: 8}}", "method.resolutions"),  # was read as 1
        ("demo", "train.g_opt.betas=[false, 0.9]", "train.g_opt.betas"),
        ("demo", "train.failures.grad_norm_change=1", "train.failures.grad_norm_change"),  # every change an alarm
        ("demo", "train.failures.grad_norm_change=.inf", "train.failures.grad_norm_change"),
        ("demo", "train.failures.grad_norm_change=true", "train.failures.grad_norm_change"),
        ("demo", "train.failures.grad_norm_warmup=0", "train.failures.grad_norm_warmup"),
        ("demo", "train.failures.grad_norm_above=.nan", "train.failures.grad_norm_above"),
        ("demo", "train.d_opt.fused=2", "train.d_opt.fused"),
    ],
)
def test_non_finite_or_out_of_range_hyperparameters_are_validation_errors(spec, override, path):
    with pytest.raises(SpecError) as info:
        load_spec(spec, [override])
    assert any(issue.path == path for issue in info.value.issues), str(info.value)


def test_a_boolean_inside_a_list_of_numbers_is_refused(cli):
    result = cli("validate", "demo", "method.loss=least_squares", "method.soft_labels={real: [true, 1.0]}")
    assert result.code == 2 and "method.soft_labels.real: expected numbers, not [true, 1.0]" in result.err
    assert "Traceback" not in result.err


def test_a_checkpoint_is_never_written_with_non_finite_weights(demo_shards, tmp_path, monkeypatch):
    run_step = loop.Trainer.run_step

    def breaks_g_at_step_2(self):
        values = run_step(self)
        if self.step == 2:  # the losses of this step were finite; the weights are not
            next(self.nets["generator"].parameters()).data.fill_(float("inf"))
        return values

    monkeypatch.setattr(loop.Trainer, "run_step", breaks_g_at_step_2)
    run_dir = tmp_path / "run"
    args = overrides(demo_shards, run_dir, 4) + ["train.checkpoint_every=1", "train.zero_stage=0"]
    with pytest.raises(loop.TrainingStopped) as info:
        loop.train(load_spec("demo", args))
    assert "generator has" in str(info.value) and "non-finite weights at step 2" in str(info.value)
    assert "The last good checkpoint is" in str(info.value) and "step-00000001" in str(info.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001"]


# ----- bounded work on any spec input
ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_hostile_spec_files_are_refused_quickly(cli, tmp_path):
    cases = {}
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    cases["bomb.yaml"] = "expands to more than 100,000 values"
    (tmp_path / "huge.yaml").write_text("a: 1\n" + "#" * (2 << 20))
    cases["huge.yaml"] = "a spec may have at most 1,048,576"
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    cases["deep.yaml"] = "nested"
    (tmp_path / "nested.yaml").write_text("".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v: 1\n")
    cases["nested.yaml"] = "nested more than 64 levels deep"
    os.mkfifo(tmp_path / "fifo.yaml")
    cases["fifo.yaml"] = "not a regular file"
    for name, message in cases.items():
        result = cli("validate", str(tmp_path / name))
        assert result.code == 2 and message in result.err, (name, result.err)
    result = cli("validate", "/dev/zero")
    assert result.code == 2 and "not a regular file" in result.err


def test_command_line_values_have_the_bounds_of_spec_files(cli):
    # one bounded YAML reader for files and overrides (a value nested 3,000 deep was a RecursionError
    # traceback, exit 1)
    cases = {
        "description=" + "[" * 3000 + "]" * 3000: "nested too deeply",
        "description=" + "[" * 100 + "]" * 100: "nested more than 64 levels deep",
        "description={" + ", ".join(ALIAS_BOMB.splitlines()) + "}": "more than 100,000 values",  # in flow style
        "train.max_steps=!!python/object/apply:os.system [echo hi]": "YAML tags are not allowed",
        "method.soft_labels={real: [0.7, 1.0], real: [0.8, 1.0]}": "duplicate key 'real'",
    }
    for override, message in cases.items():
        result = cli("validate", "demo", override)
        assert result.code == 2 and message in result.err and "Traceback" not in result.err, (override, result.err)


@pytest.mark.parametrize("base", ["x" * 5000, "demo\x00", "../demo"])
def test_bad_base_names_are_errors(write_spec, base):
    path = write_spec(json.dumps({"base": base}))
    with pytest.raises(SpecError, match="is not a spec name"):
        load_spec(str(path))


def test_a_long_chain_of_bases_is_refused(tmp_path, monkeypatch):
    for i in range(40):
        (tmp_path / f"s{i}.yaml").write_text(f"base: s{i + 1}\n" if i < 39 else "description: end\n")
    monkeypatch.setattr("pipeline.spec.load.SPECS_DIR", tmp_path)
    with pytest.raises(SpecError, match="more than 16 base specs in a chain"):
        load_spec(str(tmp_path / "s0.yaml"))


def test_a_python_tag_is_named_as_a_tag_not_a_syntax_error(cli, tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text('base: demo\ntrain:\n  max_steps: !!python/object/apply:os.system ["touch pwned"]\n')
    result = cli("validate", str(path))
    assert result.code == 2 and "YAML tags are not allowed" in result.err and ":3:" in result.err, result.err
    assert "indentation" not in result.err and not (tmp_path / "pwned").exists()


def test_an_override_error_points_at_the_command_line_not_the_replaced_line():
    with pytest.raises(SpecError) as info:
        load_spec("demo", ["train.g_opt.betas=[2.0, 0.999]"])
    (issue,) = info.value.issues
    assert issue.path == "train.g_opt.betas.0" and issue.file == "command line" and issue.line is None, issue


@pytest.mark.parametrize(
    "override, path",
    [
        ("generator.nodes.fc.out_features=true", "generator.nodes.fc.out_features"),  # was 1 feature
        ("generator.nodes.up_16.out_channels=false", "generator.nodes.up_16.out_channels"),
        ("generator.nodes.h.shape=[128, true, 4]", "generator.nodes.h.shape.1"),
    ],
)
def test_a_boolean_for_a_number_in_a_node_is_an_error_at_its_key(override, path):
    with pytest.raises(SpecError) as info:
        load_spec("demo", [override])
    (issue,) = info.value.issues
    assert issue.path == path and "expected a number, not" in issue.message, issue


def test_a_boolean_node_field_still_takes_a_boolean():
    spec = load_spec("demo", ["discriminator.nodes.down_16.preactivation=true"]).spec
    assert spec.discriminator.nodes["down_16"].preactivation is True


@pytest.mark.parametrize(
    "override, node, message",
    [
        ("generator.nodes.up_16.out_channels=1000000000000", "generator.nodes.up_16", "cannot be built"),
        ("generator.nodes.up_16.out_channels=100000000", "generator.nodes.up_16", "above the bound of 100,000,000,000"),
        ("data.num_classes=10000000000", "generator.nodes.shared", "parameters here, above the bound"),
        ("latent.z_dim=100000000000", "generator.nodes.cond", "values per image, above the bound"),
    ],
)
def test_absurd_network_sizes_are_validation_errors(override, node, message):
    with pytest.raises(SpecError) as info:
        load_spec("demo", [override])
    assert any(issue.path == node and message in issue.message for issue in info.value.issues), str(info.value)


@pytest.mark.integration
def test_a_refusal_under_a_launcher_is_printed_by_rank_0_only(tmp_path):
    said = {}
    for rank in ("0", "1"):  # as DeepSpeed's launcher starts them: one process per rank, RANK and WORLD_SIZE set
        env = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "DS_ACCELERATOR": "cpu"}
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "train", "demo", "train.batch_size=true", f"run.dir={tmp_path}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        said[rank] = result.stderr
    assert "train.batch_size" in said["0"] and said["1"] == "", said


# ----- damaged shards while training
def _damage_one_jpeg(shards, *, where: str) -> tuple[str, str]:
    """Overwrite bytes of the first JPEG of shard-000001.tar in place: its header (`where="header"`:
    no decoder takes it) or 32 bytes in the middle of its entropy-coded data (`"middle"`: it still
    decodes, to a smeared image). Returns (shard name, sample key)."""
    import tarfile

    tar = shards / "shard-000001.tar"
    with tarfile.open(tar) as archive:
        member = next(m for m in archive if m.name.endswith(".jpg"))
    data = bytearray(tar.read_bytes())
    start = member.offset_data if where == "header" else member.offset_data + member.size // 2
    data[start : start + 32] = bytes(32)
    tar.write_bytes(data)
    return tar.name, member.name.rsplit(".", 1)[0]


def test_a_jpeg_dali_cannot_decode_names_its_shard_and_sample(demo_shards, copy_shards, tmp_path):
    from pipeline.data.dali import DaliLoader
    from pipeline.data.shard_files import find_shards

    shards = copy_shards(demo_shards, tmp_path / "shards")
    shard, key = _damage_one_jpeg(shards, where="header")
    loader = DaliLoader(find_shards(shards), batch_size=64, resolution=32, num_classes=10, shuffle=False)
    with pytest.raises(SpecError) as info:
        for _ in range(loader.epoch_size // 64 + 1):
            next(loader)
    text = str(info.value)
    assert "decoders.image failed" in text, text  # DALI's own cause, kept
    assert f"SHA-256 differs from the manifest: {shard}" in text and f"{shard} sample {key!r}" in text, text
    assert "shards check" in text


def test_shards_check_names_a_sample_whose_bytes_changed_but_still_decode(demo_shards, copy_shards, tmp_path):
    from pipeline.data.check import check_shards

    shards = copy_shards(demo_shards, tmp_path / "shards")
    shard, key = _damage_one_jpeg(shards, where="middle")
    problems = {(p["shard"], p["key"]): p["problem"] for p in check_shards(shards).problems}
    assert "differ from the sidecar's digest" in problems[(shard, key)], problems
    assert (shard, None) in problems  # and the shard's checksum


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_a_shard_damaged_after_writing_is_found_while_training(
    demo_shards, copy_shards, tmp_path, capsys, metrics, on_bad_sample
):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    shard, key = _damage_one_jpeg(shards, where="middle")  # decodes without an error: only the checksums tell
    # the shard is hashed in the background: 20 steps leave it ample time to report
    args = overrides(shards, tmp_path / "run", 20) + ["train.log_every=1", f"data.on_bad_sample={on_bad_sample}"]
    loaded = load_spec("demo", args)
    if on_bad_sample == "error":
        with pytest.raises(SpecError) as info:
            loop.train(loaded)
        text = str(info.value)
        assert f"shard {shard} of stream 'images'" in text and f"damaged samples: {key!r}" in text, text
    else:
        loop.train(loaded)
        err = capsys.readouterr().err
        assert f"warning: shard {shard} of stream 'images'" in err and err.count(shard) == 1, err
        assert [r["data_skipped"] for r in metrics(tmp_path / "run")] == [0] * 20


def test_more_skipped_samples_than_the_bound_stop_the_run(demo_shards, copy_shards, tmp_path):
    import tarfile

    shards = copy_shards(demo_shards, tmp_path / "shards")
    tar = shards / "shard-000000.tar"
    with tarfile.open(tar) as archive:
        labels = [m for m in archive if m.name.endswith(".cls")][:3]
    data = bytearray(tar.read_bytes())
    for member in labels:  # three labels that are not integers, same length so the index stays right
        data[member.offset_data : member.offset_data + member.size] = b"x" * member.size
    tar.write_bytes(data)
    base = overrides(shards, tmp_path / "run", 200) + ["train.log_every=1", "data.on_bad_sample=skip"]
    with pytest.raises(SpecError, match=r"bad samples were skipped, more than data.max_bad_samples=2"):
        loop.train(load_spec("demo", base + ["data.max_bad_samples=2"]))


def test_a_batch_larger_than_the_data_is_refused_before_dali_runs_out_of_memory(demo_shards, tmp_path):
    from pipeline.train.preflight import preflight

    spec = load_spec("demo", [f"data.shards={demo_shards}", "train.batch_size=1000000000"]).spec
    (issue,) = preflight(spec, world_size=1)
    assert issue.path == "train.batch_size" and "1,797 samples over 1 rank" in issue.message, issue


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 12000000000 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_out_of_memory_in_a_step_names_the_step_batch_and_stage(demo_shards, tmp_path, monkeypatch, error):
    run_step = loop.Trainer.run_step

    def runs_out(self):
        if self.step == 2:
            raise error
        return run_step(self)

    monkeypatch.setattr(loop.Trainer, "run_step", runs_out)
    run_dir = tmp_path / "run"
    args = overrides(demo_shards, run_dir, 4) + ["train.checkpoint_every=2", "train.batch_size=16"]
    args += ["method.resolutions={8: {batch_size: 8}}", "method.fade_images=16", "method.stable_images=16"]
    with pytest.raises(SpecError) as info:
        loop.train(load_spec("progan_demo", args))
    (issue,) = info.value.issues
    first = str(error).splitlines()[0]
    assert issue.message.startswith("out of memory in step 3 at resolution 8 (fade), a batch of 8 (8 per micro-batch")
    assert first in issue.message and "step-00000002" in issue.message and "train.batch_per_rank" in issue.hint
    assert issue.path == "method.resolutions.8.batch_size"
    assert not (run_dir / "LOCK").exists()  # released: the next run starts without a warning


def test_a_truncated_shard_of_a_named_stream_is_reported_under_that_stream(demo_shards, copy_shards, tmp_path):
    # a CSGAN stream's truncated shard was reported under data.shards, a key its spec does not have
    from pipeline.data.dali import DaliLoader, check_stream

    shards = copy_shards(demo_shards, tmp_path / "shards")
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    spec = load_spec("csgan_demo", [f"data.streams.a.shards={demo_shards}", f"data.streams.b.shards={shards}"]).spec
    found = check_stream(spec, "b")
    assert found.path == "data.streams.b.shards"
    loader = DaliLoader(found, batch_size=64, resolution=32, num_classes=None, shuffle=False)
    with pytest.raises(SpecError) as info:
        for _ in range(loader.epoch_size // 64 + 2):
            next(loader)
    (issue,) = info.value.issues
    assert issue.path == "data.streams.b.shards" and "shard-000001.tar" in str(info.value), str(info.value)
