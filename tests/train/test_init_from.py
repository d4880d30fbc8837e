"""train.init_from: a new run starting from another run's export (G, D and EMA where present,
optimizers fresh, step 0), the class tables sliced or re-initialised by an explicit option, and
ignored on resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import SpecError
from pipeline.graph import build_network
from pipeline.spec import load_spec
from pipeline.train import init_from, loop
from pipeline.train.streams import close

FAST = ["method.d_steps=1", "train.batch_size=16", "train.log_every=1", "train.sample_every=100"]
FAST += ["train.checkpoint_every=100", "eval.every=null"]


@pytest.fixture(scope="module")
def source_export(demo_shards, tmp_path_factory):
    """A finished 2-step demo run's export (generator.safetensors: its EMA, equal to G before
    the EMA starts)."""
    run_dir = tmp_path_factory.mktemp("source")
    loop.train(load_spec("demo", [f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=2", *FAST]))
    return run_dir / "export"


@pytest.mark.slow  # trains the source run (a module fixture)
def test_a_run_starts_from_another_runs_export(demo_shards, source_export, tmp_path, capsys):
    spec = load_spec(
        "demo", [f"data.shards={demo_shards}", f"run.dir={tmp_path}", f"train.init_from={source_export}", *FAST]
    )
    tr = loop.Trainer(spec)
    exported = load_file(source_export / "generator.safetensors")
    for name, ours in [("G", tr.nets["generator"].state_dict()), ("EMA", tr.emas["generator"].state_dict())]:
        assert set(ours) == set(exported), name
        for key, value in exported.items():
            assert torch.equal(ours[key].cpu(), value), (name, key)
    assert tr.step == 0 and tr.images_seen == 0
    err = capsys.readouterr().err
    assert "generator <- generator.safetensors" in err and "discriminator: not in the export, random init" in err
    # D was not in the export: it is the new run's own random init (the seed's), not the source's
    fresh = load_spec("demo", [f"data.shards={demo_shards}", f"run.dir={tmp_path / 'fresh'}", *FAST])
    torch.manual_seed(fresh.spec.seed)
    build_network(fresh, "generator", compile=False)
    d = build_network(fresh, "discriminator", compile=False).state_dict()
    for key, value in tr.nets["discriminator"].state_dict().items():
        assert torch.equal(value.cpu(), d[key]), key
    close(tr.streams)


@pytest.mark.slow  # two training calls
def test_init_from_is_ignored_on_resume(demo_shards, source_export, tmp_path, capsys):
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", f"train.init_from={source_export}", *FAST]
    loop.train(load_spec("demo", [*args, "train.max_steps=1"]))
    capsys.readouterr()
    summary = loop.train(load_spec("demo", [*args, "train.max_steps=2"]))
    assert summary.step == 2 and summary.steps_run == 1
    assert "train.init_from ignored: resuming from" in capsys.readouterr().err


def _with_both_files(source_export, tmp_path):
    """An export holding the generator's own weights beside a different EMA, and a D (as an import of
    BigGAN-PyTorch's G.pth, G_ema.pth and D.pth writes)."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "spec.yaml").write_text((source_export / "spec.yaml").read_text())
    g = load_file(source_export / "generator.safetensors")
    save_file(g, export / "generator-train.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in g.items()}, export / "generator.safetensors")
    loaded = load_spec("demo")
    torch.manual_seed(123)
    save_file(build_network(loaded, "discriminator", compile=False).state_dict(), export / "discriminator.safetensors")
    return export


def test_network_ema_and_discriminator_each_take_their_file(source_export, tmp_path):
    export = _with_both_files(source_export, tmp_path)
    loaded = load_spec("demo", [f"train.init_from={export}"])
    nets = {n: build_network(loaded, n, compile=False) for n in ("generator", "discriminator")}
    emas_to_load = init_from.load_networks(loaded.spec, nets, report=False)
    assert emas_to_load == {"generator": export / "generator.safetensors"}
    for key, value in load_file(export / "generator-train.safetensors").items():
        assert torch.equal(nets["generator"].state_dict()[key], value), key
    for key, value in load_file(export / "discriminator.safetensors").items():
        assert torch.equal(nets["discriminator"].state_dict()[key], value), key
    from pipeline.train.ema import EMA

    emas = {"generator": EMA(nets["generator"], 0.99)}
    init_from.load_emas(emas, emas_to_load, loaded.spec)
    for key, value in load_file(export / "generator.safetensors").items():
        assert torch.equal(emas["generator"].state_dict()[key], value), key


def test_another_class_count_is_refused_without_init_classes(source_export):
    loaded = load_spec("demo", [f"train.init_from={source_export}", "data.num_classes=4"])
    nets = {"generator": build_network(loaded, "generator", compile=False)}
    with pytest.raises(SpecError) as err:
        init_from.load_networks(loaded.spec, nets, report=False)
    text = str(err.value)
    assert "10 classes" in text and "num_classes 4" in text and "train.init_classes=slice" in text
    more = load_spec("demo", [f"train.init_from={source_export}", "data.num_classes=12", "train.init_classes=slice"])
    with pytest.raises(SpecError, match="cannot slice 12 classes out of the 10"):
        init_from.load_networks(more.spec, {"generator": build_network(more, "generator", compile=False)}, report=False)


@pytest.mark.parametrize("mode", ["slice", "reinit"])
def test_class_tables_sliced_or_reinitialised(source_export, mode):
    loaded = load_spec("demo", [f"train.init_from={source_export}", "data.num_classes=4", f"train.init_classes={mode}"])
    torch.manual_seed(7)
    nets = {n: build_network(loaded, n, compile=False) for n in ("generator", "discriminator")}
    fresh = {k: v.clone() for k, v in nets["generator"].state_dict().items()}
    init_from.load_networks(loaded.spec, nets, report=False)
    g, source = nets["generator"].state_dict(), load_file(source_export / "generator.safetensors")
    assert g["shared.weight"].shape == (4, 32)
    expected = source["shared.weight"][:4] if mode == "slice" else fresh["shared.weight"]
    assert torch.equal(g["shared.weight"], expected)
    for key, value in source.items():  # everything but the class table is the source's
        if key != "shared.weight":
            assert torch.equal(g[key], value), key
