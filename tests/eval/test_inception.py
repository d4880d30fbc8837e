"""The FID Inception written here (pipeline/eval/inception.py) and the scores, against torch-fidelity
0.4.0 itself: the same network output on the same weights file, the same FID, KID and IS on the
same images; and every kind of wrong weights or statistics file refused as a user error.

The weights are random (a file in torch-fidelity's exact format, `random_inception_weights`):
nothing is downloaded. Equal outputs on random weights mean an equal network on any weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import SpecError
from pipeline.eval.features import load_feature_net
from pipeline.eval.inception import OFFICIAL_SHA256, WEIGHTS_FILE, expected_shapes, resize_bilinear_tf1
from pipeline.eval.metrics import inception_score, kernel_inception_distance

NUM_REAL, NUM_FAKE = 12, 20


def random_images(num: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, height, width), dtype=torch.uint8, generator=gen)


# ----- the network
def test_resize_is_tensorflow_1x_bilinear_worked_by_hand():
    image = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    # output pixel i reads input i * 2/4 = 0, 0.5, 1, 1.5; past the last pixel it repeats the edge
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    assert resize_bilinear_tf1(image, 4)[0, 0].tolist() == expected


def test_resize_equals_torch_fidelitys(torch_fidelity):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    for height, width in ((32, 32), (7, 13), (299, 299), (512, 300)):
        images = random_images(2, height, width).float()
        theirs = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
        assert torch.equal(resize_bilinear_tf1(images, 299), theirs)


def test_inception_equals_torch_fidelitys_bit_for_bit(torch_fidelity, random_inception_weights):
    """Features and unbiased logits equal to the last bit on CPU (the same operations in the same order)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(random_inception_weights)
    )
    ours = load_feature_net(f"inception:{random_inception_weights}")
    assert (ours.num_features, ours.num_classes, ours.input_size) == (2048, 1008, 299)
    for images in (random_images(3, 32, 32), random_images(1, 300, 320, seed=1)):
        with torch.no_grad():
            features, logits = ours(images)
            their_features, their_logits = theirs(images)
        assert torch.isfinite(features).all() and features.std() > 0.01 and logits.std() > 0.01
        assert torch.equal(features, their_features) and torch.equal(logits, their_logits)


def test_the_weights_are_marked_official_only_with_the_official_sha256(random_inception_weights, monkeypatch):
    assert OFFICIAL_SHA256.startswith(WEIGHTS_FILE.rsplit("-", 1)[1].removesuffix(".pth"))  # torch hub's prefix
    protocol = load_feature_net(f"inception:{random_inception_weights}").protocol()
    assert protocol["feature_net_official"] is False
    assert protocol["feature_net_weights"].startswith("NOT the official FID weights")
    import pipeline.eval.features as features

    monkeypatch.setattr(features, "OFFICIAL_SHA256", protocol["feature_net_sha256"])
    protocol = load_feature_net(f"inception:{random_inception_weights}").protocol()
    assert protocol["feature_net_official"] is True and protocol["feature_net_weights"] == "the official FID weights"


def bad_weights_files(folder) -> dict[str, tuple]:
    """(file, what the error must say) for each kind of wrong weights file. Their tensors are expanded
    zeros: the right shapes in a few bytes."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    full = {k: torch.tensor(0.0).expand(shape) for k, shape in expected_shapes().items()}
    files = {}

    def write(name, state):
        torch.save(state, folder / name)
        return folder / name

    (folder / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    files["random bytes"] = (folder / "random.pth", "cannot be read as torch weights")
    (folder / "empty.pth").write_bytes(b"")
    files["empty"] = (folder / "empty.pth", "empty")
    files["not a dict"] = (write("list.pth", list(full.values())[:3]), "holds a list, not a state dict")
    missing = {k: v for k, v in full.items() if "Mixed_7c" not in k}
    files["missing keys"] = (write("missing.pth", missing), "are missing: Mixed_7c.")
    misshaped = full | {"fc.weight": torch.zeros(1).expand(1000, 2048)}
    files["misshaped"] = (write("misshaped.pth", misshaped), "fc.weight is (1000, 2048), not (1008, 2048)")
    files["extra keys"] = (write("extra.pth", full | {"AuxLogits.fc.weight": torch.zeros(2)}), "no place for")
    files["non-finite"] = (write("nan.pth", full | {"fc.bias": torch.full((1008,), float("nan"))}), "NaN")
    save_file({k: v.contiguous() for k, v in list(full.items())[:2]}, folder / "weights.safetensors")
    files["safetensors"] = (folder / "weights.safetensors", "safetensors")

    class Payload:  # a pickle that would run code when unpickled with weights_only=False
        def __reduce__(self):
            return (print, ("code ran",))

    files["code"] = (write("code.pth", {"fc.weight": Payload()}), "cannot be read as torch weights")
    return files


def test_wrong_weights_files_are_user_errors_naming_the_file_and_the_fault(tmp_path, capsys):
    for kind, (path, fault) in bad_weights_files(tmp_path / "bad").items():
        with pytest.raises(SpecError) as info:
            load_feature_net(f"inception:{path}", what="eval.features")
        issue = info.value.issues[0]
        assert issue.file == str(path) and issue.path == "eval.features", kind
        assert fault in issue.message, (kind, issue.message)
        assert WEIGHTS_FILE in issue.hint, kind
    assert "code ran" not in capsys.readouterr().out


# ----- the scores
def test_kid_and_is_equal_torch_fidelitys_on_the_same_features(torch_fidelity):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen = torch.Generator().manual_seed(0)
    fake, real = torch.rand(300, 64, generator=gen), torch.rand(250, 64, generator=gen) + 0.05
    logits = 3 * torch.randn(300, 20, generator=gen)
    theirs = kid_features_to_metric(fake, real, kid_subsets=30, kid_subset_size=100, verbose=False, rng_seed=2020)
    kid_mean, kid_std = kernel_inception_distance(fake, real, num_subsets=30, subset_size=100, seed=2020)
    assert kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert kid_std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    # another draw of subsets is another figure: the draws are the reference's
    assert kernel_inception_distance(fake, real, num_subsets=30, subset_size=100, seed=1)[0] != pytest.approx(
        kid_mean, rel=1e-3
    )
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    is_mean, is_std = inception_score(logits, num_splits=10, seed=2020)
    assert is_mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert is_std == pytest.approx(theirs["inception_score_std"], rel=1e-12)  # population std (ddof 0)


# ----- `eval --features inception:PATH` on a tiny run, against torch-fidelity's calculate_metrics
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A demo-spec run trained for one step on NUM_REAL random 32px images (10 classes), never evaluated."""
    from pipeline.data.shards import write_samples
    from pipeline.spec import load_spec
    from pipeline.train.loop import train

    shards, run_dir = tmp_path_factory.mktemp("tiny-shards"), tmp_path_factory.mktemp("tiny-run")
    images = random_images(NUM_REAL, 32, 32, seed=3)
    samples = [(f"img/{i:03d}", Image.fromarray(img.permute(1, 2, 0).numpy()), i % 10) for i, img in enumerate(images)]
    write_samples(samples, shards, classes={str(c): c for c in range(10)}, source="test", shard_size=8, overwrite=True)
    overrides = ["train.batch_size=4", "train.max_steps=1", "train.log_every=1", "train.sample_every=1"]
    overrides += ["train.checkpoint_every=1", "eval.every=0", f"data.shards={shards}", f"run.dir={run_dir}"]
    train(load_spec("demo", overrides))
    return run_dir, shards


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _scored_images(run_dir, shards) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated and real images `eval --num 20 --standing-stats 0` scores, made again."""
    from pipeline.data.dali import real_images
    from pipeline.eval.evaluate import fake_batches
    from pipeline.eval.sampling import load_generator

    gen = load_generator(run_dir)
    spec = gen.spec
    fake = fake_batches(
        gen.module.eval(),
        num=NUM_FAKE,
        z_dim=spec.latent.z_dim,
        num_classes=spec.data.num_classes,
        truncation=None,
        mode="truncate",
        seed=spec.seed,
        batch_size=100,
        distribution=spec.latent.distribution,
    )
    real = real_images(shards, resolution=32, batch_size=250)
    return torch.cat([i.cpu() for i, _ in fake]), torch.cat([i.cpu() for i, _ in real])


@pytest.mark.slow  # 84 Inception forwards at 299x299 on CPU (ours, torch-fidelity's, ours on the .npz)
def test_eval_with_inception_equals_torch_fidelitys_calculate_metrics(
    cli, tiny_run, torch_fidelity, random_inception_weights, tmp_path
):
    run_dir, shards = tiny_run
    weights = random_inception_weights
    result = cli(
        "eval", run_dir, "--features", f"inception:{weights}", "--num", NUM_FAKE, "--standing-stats", "0",
        "--out", tmp_path, "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    ours = json.loads(result.out)["results"][0]
    protocol = ours["protocol"]
    assert protocol["feature_net"] == "inception-v3-compat" and protocol["feature_net_official"] is False
    assert protocol["num_samples"] == NUM_FAKE and protocol["num_real_samples"] == NUM_REAL
    assert protocol["kid_subset_size"] == min(NUM_FAKE, NUM_REAL) and protocol["kid_subsets"] == 100
    assert protocol["seed"] == 2020 and protocol["is_splits"] == 10

    fake, real = _scored_images(run_dir, shards)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(fake),
        input2=_Images(real),
        isc=True,
        fid=True,
        kid=True,
        kid_subset_size=min(NUM_FAKE, NUM_REAL),
        feature_extractor_weights_path=str(weights),
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    pairs = {
        "fid": "frechet_inception_distance",
        "kid_mean": "kernel_inception_distance_mean",
        "kid_std": "kernel_inception_distance_std",
        "is_mean": "inception_score_mean",
        "is_std": "inception_score_std",
    }
    for key, their_key in pairs.items():
        assert ours[key] == pytest.approx(theirs[their_key], rel=1e-4), (key, ours[key], theirs[their_key])
    assert ours["fid"] > 0 and ours["is_mean"] > 1

    # the same real statistics given as a published .npz: the same FID, no KID
    stats = tmp_path / "real_inception_moments.npz"
    from safetensors.torch import load_file

    cache = load_file(next(shards.glob("fid-stats-inception-v3-compat-*-32px.safetensors")))
    mu, sigma = cache["mu"].numpy(), cache["sigma"].numpy()
    np.savez(stats, mu=mu, sigma=sigma)
    result = cli(
        "eval", run_dir, "--features", f"inception:{weights}", "--num", NUM_FAKE, "--standing-stats", "0",
        "--real-stats", stats, "--out", tmp_path / "npz",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "KID not computed" in result.out and "NOT the official FID weights" in result.out
    record = json.loads(next((tmp_path / "npz").glob("*.json")).read_text())["results"][0]
    assert record["fid"] == pytest.approx(ours["fid"], rel=1e-9) and record["kid_mean"] is None
    assert record["protocol"]["real_stats_sha256"] == __import__("hashlib").sha256(stats.read_bytes()).hexdigest()
    assert "KID needs real features" in record["protocol"]["kid_not_computed"]


def wrong_statistics_files(folder) -> dict[str, str]:
    """{file: what the error must say} for each kind of wrong --real-stats file (the network gives 2048)."""
    folder.mkdir(exist_ok=True)
    np.savez(folder / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "no_sigma.npz", mu=np.zeros(2048))
    np.savez(folder / "misshaped.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 4)))
    np.savez(folder / "text.npz", mu=np.array(["a"] * 2048), sigma=np.eye(2048))
    np.save(folder / "one.npy", np.zeros(2048))
    np.savez(folder / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    (folder / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    return {
        "small.npz": "statistics of 64 features, and the feature network inception-v3-compat gives 2048",
        "no_sigma.npz": "lacks sigma (it holds mu)",
        "misshaped.npz": "sigma (2048, 4)",
        "text.npz": "must be numbers",
        "one.npy": "one array",
        "pickled.npz": "pickled",
        "junk.npz": "cannot read it as .npz",
        "absent.npz": "does not exist",
    }


def test_wrong_statistics_files_are_user_errors_with_both_dimensions(tmp_path):
    from pipeline.eval.features import FeatureNet
    from pipeline.eval.metrics import published_stats

    class Net2048(FeatureNet):
        name, num_features = "inception-v3-compat", 2048

    for name, fault in wrong_statistics_files(tmp_path).items():
        with pytest.raises(SpecError) as info:
            published_stats(tmp_path / name, Net2048())
        issue = info.value.issues[0]
        assert issue.file == str(tmp_path / name) and issue.path == "--real-stats", name
        assert fault in issue.message and "mu (D,) and sigma (D, D)" in issue.hint, (name, issue.message)
    np.savez(tmp_path / "good.npz", mu=np.ones(2048, dtype=np.float32), sigma=np.eye(2048))
    stats = published_stats(tmp_path / "good.npz", Net2048())
    assert stats.kid_features is None and stats.mu.dtype == torch.float64 and stats.sha256 is not None


@pytest.mark.slow  # loads the run and the 95 MB weights file for each case
def test_eval_refuses_wrong_weights_and_statistics_files_with_status_2(
    cli, tiny_run, random_inception_weights, tmp_path
):
    run_dir, _ = tiny_run
    bad = bad_weights_files(tmp_path / "bad")
    for kind in ("random bytes", "safetensors", "missing keys"):
        path, fault = bad[kind]
        result = cli("eval", run_dir, "--features", f"inception:{path}", "--num", "4")
        assert result.code == 2 and "Traceback" not in result.err, (kind, result.err)
        assert str(path) in result.err and fault in result.err, (kind, result.err)
    faults = wrong_statistics_files(tmp_path / "stats")
    for name in ("small.npz", "pickled.npz"):
        path = tmp_path / "stats" / name
        result = cli("eval", run_dir, "--features", f"inception:{random_inception_weights}", "--real-stats", path)
        assert result.code == 2 and "Traceback" not in result.err, (name, result.err)
        assert str(path) in result.err and faults[name] in result.err, (name, result.err)
