import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `python -m pipeline ...` in-process; any exception other than a clean exit fails the test."""
    from pipeline.cli import main

    def run(*argv) -> CliResult:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_spec(tmp_path):
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def root() -> Path:
    """The repository root: where subprocesses run `python -m pipeline` from."""
    return ROOT


@pytest.fixture(params=SPECS)
def shipped_spec(request) -> str:
    """The name of each spec in specs/ in turn: a test taking it runs once per shipped spec."""
    return request.param


@pytest.fixture(scope="session")
def family_block_kinds() -> set[str]:
    """The block kinds of the ProGAN, DCGAN, U-Net, image-translation and R3GAN modules, whose forward tests are in
    test_family_blocks.py; every other kind's are in test_blocks.py."""
    from pipeline.blocks import REGISTRY

    family_modules = {f"pipeline.blocks.{name}" for name in ("progan", "dcgan", "unet", "translation", "r3gan")}
    return {kind for kind, params in REGISTRY.items() if params.__module__ in family_modules}


@pytest.fixture(scope="session")
def clean_env() -> dict:
    """The environment for a `python -m pipeline` subprocess: CPU, and none of the variables of a
    surrounding distributed launch (the subprocess starts its own ranks)."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launch} | {"DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="session")
def metrics():
    """metrics(run_dir): the rows of a run's metrics.jsonl."""

    def read(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    return read


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="session")
def copy_shards():
    """copy_shards(src, dst): a private copy of the shard directory SRC at DST (which must not
    exist), for a test that changes its shards."""
    return _copy_shards


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo shards, built once per session and shared: tests read them and never write there
    (a test that changes shards changes a `copy_shards` copy). Checked at the end of the session."""
    from pipeline.data.demo import build_demo_shards

    out = tmp_path_factory.mktemp("demo-shards")
    build_demo_shards(out)
    before = _snapshot(out)
    yield out
    assert _snapshot(out) == before, f"a test changed the shared demo shards in {out}"


@pytest.fixture(scope="session")
def demo_shards_with_classifier(demo_shards, tmp_path_factory):
    """A copy of the demo shards with the demo classifier trained beside them, once per session,
    by `python -m pipeline demo-data` (which finds the shards there). Shared like `demo_shards`;
    evaluation caches its reference statistics there (the same file whichever test writes it first)."""
    from pipeline.cli import main

    out = _copy_shards(demo_shards, tmp_path_factory.mktemp("demo-classifier") / "shards")
    assert main(["demo-data", "--out", str(out)]) == 0
    before = _snapshot(out)
    yield out
    after = {name: stat for name, stat in _snapshot(out).items() if not name.startswith("fid-stats-")}
    assert after == before, f"a test changed the shared demo shards and classifier in {out}"


sys.path.insert(0, str(ROOT))


# ----- `just test-fast`: the tests that are neither `slow` nor `integration` -----
# A test is an integration test when it trains, compiles, starts processes or builds the demo
# data: marked `@pytest.mark.integration` where it says so, and here by the fixtures it uses (a
# fixture that trains or builds, or a subprocess's environment) and by module (one whose tests
# train for the most part).
INTEGRATION_FIXTURES = {
    "demo_shards",  # the demo shards, built once per session
    "demo_shards_with_classifier",  # and the demo classifier trained beside them
    "clean_env",  # a `python -m pipeline` subprocess
    "domains",  # eval/test_translation_eval.py: the two-domain digits and their classifiers
    "domain_shards",  # methods/test_methods.py: the same
    "tiny_run",  # eval/test_sampling.py: a trained run
}
INTEGRATION_MODULES = {
    "graph/test_compile.py",  # torch.compile
    "blocks/test_sync_bn.py",  # two gloo ranks in processes of their own
    "methods/test_logan_unet.py",  # trains LOGAN and U-Net GAN specs
    "profile/test_profile.py",  # profiles training steps
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.relative_to(ROOT / "tests").as_posix()
        if module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
