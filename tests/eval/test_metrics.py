"""The metric code (FID, KID, IS, class accuracy, cached reference statistics) and the demo classifier, on CPU.

Most tests use `QuadrantNet`, a feature network whose features are known functions of the pixels,
so the expected scores follow from the definitions; the demo classifier is trained once per session.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pipeline.data.dali import real_images
from pipeline.errors import SpecError
from pipeline.eval.classifier import RECORD_FILE, WEIGHTS_FILE, demo_classifier_ready, train_demo_classifier
from pipeline.eval.features import INCEPTION_WEIGHTS, FeatureNet, load_feature_net
from pipeline.eval.metrics import Scorer, reference_from_batches, reference_stats
from pipeline.images import to_uint8

NUM_CLASSES = 10
CLASSES = {str(c): c for c in range(NUM_CLASSES)}
FAST = {"kid_subsets": 20, "kid_subset_size": 100}


class QuadrantNet(FeatureNet):
    """Features: the mean of each quadrant of each channel, in 0..1 (12 of them). Logits: zero
    ("uniform"), or confidently the class written in the top-left red pixel ("confident")."""

    name = "quadrant-test-net"
    input_size = 16
    resize_filter = "none"
    num_features, num_classes = 12, NUM_CLASSES

    def __init__(self, logits: str = "confident", checksum: str = "0" * 64):
        super().__init__()
        self.logits, self.checksum, self.classes = logits, checksum, CLASSES
        self.num_calls = 0

    def forward(self, images):
        self.num_calls += 1
        x = images.float() / 255
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quadrants = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        features = torch.cat([q.mean((-2, -1)) for q in quadrants], 1)
        if self.logits == "uniform":
            return features, torch.zeros(len(x), self.num_classes)
        label = images[:, 0, 0, 0].long() % self.num_classes
        return features, 30.0 * torch.nn.functional.one_hot(label, self.num_classes).float()


def make_images(num: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a random level per image and channel plus pixel noise, kept within 40..150 so a
    brightness shift of up to 100 is never clipped; the class (i mod 10) is written in the red top-left pixel."""
    gen = torch.Generator().manual_seed(seed)
    level = torch.randint(40, 120, (num, 3, 1, 1), generator=gen)
    images = (level + torch.randint(0, 30, (num, 3, 16, 16), generator=gen)).to(torch.uint8)
    labels = torch.arange(num) % NUM_CLASSES
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    return images, labels


def batches(images, labels=None, size: int = 100):
    return [
        (images[i : i + size], None if labels is None else labels[i : i + size]) for i in range(0, len(images), size)
    ]


@pytest.fixture(scope="module")
def reference():
    images, labels = make_images()
    return reference_from_batches(batches(images, labels), QuadrantNet(), classes=CLASSES)


# ----- FID, KID, IS, class accuracy -----
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(reference):
    images, labels = make_images()
    scorer = Scorer(QuadrantNet(), reference, **FAST)
    fids = []
    for shift in (0, 10, 20, 40, 100):
        fids.append(scorer(batches(images + shift, labels))["fid"])
        # equal covariances: FID is the squared distance of the means, 12 features each moved by shift/255
        assert fids[-1] == pytest.approx(12 * (shift / 255) ** 2, rel=1e-3, abs=1e-9)
    assert abs(fids[0]) < 1e-9
    assert fids == sorted(fids) and len(set(fids)) == len(fids)


def test_fid_against_other_samples_of_the_same_distribution_is_small(reference):
    other = make_images(seed=1)[0]
    scorer = Scorer(QuadrantNet(), reference, **FAST)
    fid_same = scorer(batches(other))["fid"]
    fid_shifted = scorer(batches(other + 20))["fid"]
    assert 0 < fid_same < 0.2 * fid_shifted


def test_kid_is_near_zero_for_the_same_set_and_grows_with_a_shift(reference):
    images, labels = make_images()
    scorer = Scorer(QuadrantNet(), reference, **FAST)
    kids = [scorer(batches(images + shift, labels))["kid_mean"] for shift in (0, 20, 100)]
    assert abs(kids[0]) < 0.05 * kids[1]
    assert kids[0] < kids[1] < kids[2]


def test_scores_are_repeatable_given_the_seed(reference):
    images, labels = make_images(seed=2)
    first = Scorer(QuadrantNet(), reference, **FAST)(batches(images, labels))
    again = Scorer(QuadrantNet(), reference, **FAST)(batches(images, labels))
    other_seed = Scorer(QuadrantNet(), reference, seed=1, **FAST)(batches(images, labels))
    assert first == again
    assert first["kid_mean"] != other_seed["kid_mean"]


def test_inception_score_of_uniform_predictions_is_one(reference):
    images, labels = make_images()
    scores = Scorer(QuadrantNet("uniform"), reference, **FAST)(batches(images, labels))
    assert scores["is_mean"] == pytest.approx(1.0, abs=1e-6)
    assert scores["is_std"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")  # std() of one split: there is no spread
def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes(reference):
    images, labels = make_images()  # 40 images of each class
    scorer = Scorer(QuadrantNet(), reference, is_splits=1, **FAST)
    assert scorer(batches(images, labels))["is_mean"] == pytest.approx(NUM_CLASSES, rel=1e-4)
    one_class = images.clone()
    one_class[:, 0, 0, 0] = 3
    assert scorer(batches(one_class))["is_mean"] == pytest.approx(1.0)


def test_class_accuracy_counts_samples_classified_as_their_condition(reference):
    images, labels = make_images()
    scorer = Scorer(QuadrantNet(), reference, **FAST)
    assert scorer(batches(images, labels))["class_accuracy"] == 1.0
    wrong = labels.clone()
    wrong[:100] = (wrong[:100] + 1) % NUM_CLASSES
    assert scorer(batches(images, wrong))["class_accuracy"] == 0.75
    assert scorer(batches(images))["class_accuracy"] is None
    foreign = QuadrantNet()
    foreign.classes = {"cat": 0, "dog": 1}  # its logits are not the data's classes
    assert Scorer(foreign, reference, **FAST)(batches(images, labels))["class_accuracy"] is None


def test_the_protocol_is_recorded_with_the_scores(reference):
    images, labels = make_images()
    scorer = Scorer(QuadrantNet(), reference, kid_subsets=5, kid_subset_size=1000)
    scores = scorer(batches(images[:250], labels[:250]))
    protocol = scores["protocol"]
    assert protocol["feature_net"] == "quadrant-test-net" and protocol["feature_net_sha256"] == "0" * 64
    assert protocol["num_samples"] == 250 and protocol["num_real_samples"] == 400
    assert protocol["kid_subset_size"] == 250  # capped by the samples there are
    assert protocol["kid_subsets"] == 5 and protocol["resize_filter"] == "none" and protocol["resolution"] == 16
    json.dumps(scores)  # written next to every score as it is


def test_non_finite_scores_are_null_named_and_warned_about(reference):
    class Overflowing(QuadrantNet):
        def forward(self, images):
            features, logits = super().forward(images)
            features[:3] = float("inf")  # as a feature network that overflows on 3 images a batch
            return features, logits

    images, labels = make_images()
    with pytest.warns(UserWarning, match="fid, kid_mean, kid_std came out NaN or infinite.*12 of 400 generated"):
        scores = Scorer(Overflowing(), reference, **FAST)(batches(images, labels))
    assert (
        scores["fid"] is None and scores["kid_mean"] is None and scores["non_finite"] == ["fid", "kid_mean", "kid_std"]
    )
    assert scores["is_mean"] == pytest.approx(NUM_CLASSES, rel=0.2)  # the logits were finite
    json.dumps(scores, allow_nan=False)  # valid JSON


def test_kid_and_is_follow_the_reference_protocol_by_default(reference):
    images, labels = make_images(seed=2)
    scores = Scorer(QuadrantNet(), reference, **FAST)(batches(images, labels))
    protocol = scores["protocol"]
    assert protocol["seed"] == 2020 and "RandomState(seed).choice(generated)" in protocol["scores_follow"]
    assert "ddof 0" in protocol["scores_follow"]


def test_scoring_checks_its_inputs(reference):
    images, _ = make_images()
    with pytest.raises(SpecError, match="computed with"):
        Scorer(QuadrantNet(checksum="1" * 64), reference)
    scorer = Scorer(QuadrantNet(), reference)
    with pytest.raises(SpecError, match="32px"):
        scorer([(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), None)])
    with pytest.raises(TypeError, match="uint8"):
        scorer([(images.float(), None)])
    with pytest.raises(SpecError, match="too few"):
        scorer([(images[:1], None)])


def test_kid_real_features_are_a_capped_random_subset():
    images, labels = make_images()
    full = reference_from_batches(batches(images, labels), QuadrantNet(), max_kid_features=1000)
    capped = reference_from_batches(batches(images, labels), QuadrantNet(), max_kid_features=50)
    assert len(full.kid_features) == 400 and len(capped.kid_features) == 50
    assert len({tuple(row.tolist()) for row in capped.kid_features}) == 50
    assert all((full.kid_features == row).all(1).any() for row in capped.kid_features)
    # the subset spans the stream, not just its first batch
    first_batch = QuadrantNet()(images[:100])[0]
    assert not all((first_batch == row).all(1).any() for row in capped.kid_features)


def test_to_uint8_inverts_the_loaders_normalization():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(pixels.float() / 127.5 - 1), pixels)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# ----- reference statistics cached beside the shards -----
def write_tiny_shards(out, seed: int = 0):
    from pipeline.data.shards import write_samples

    images, labels = make_images(num=40)
    samples = [
        (f"img/{i:03d}", Image.fromarray(img.permute(1, 2, 0).numpy()), int(label))
        for i, (img, label) in enumerate(zip(images, labels, strict=True))
    ]
    return write_samples(
        samples, out, classes=CLASSES, source="test", shard_size=16, resolution=16, seed=seed, overwrite=True
    )


def test_reference_stats_are_cached_once_reused_and_invalidated_when_the_manifest_changes(tmp_path):
    write_tiny_shards(tmp_path)
    net = QuadrantNet()
    first = reference_stats(tmp_path, net, batch_size=16)
    calls = net.num_calls
    assert calls == 3 and first.num_samples == 40
    assert first.path == tmp_path / "fid-stats-quadrant-test-net-000000000000-16px.safetensors"
    assert first.path.is_file() and first.real_class_accuracy is not None

    again = reference_stats(tmp_path, net, batch_size=16)
    assert net.num_calls == calls  # read from the file, not computed
    assert torch.equal(again.sigma, first.sigma) and again.num_samples == 40
    assert torch.equal(again.kid_features, first.kid_features) and again.classes == CLASSES

    write_tiny_shards(tmp_path, seed=1)  # another shuffle: another manifest
    rebuilt = reference_stats(tmp_path, net, batch_size=16)
    assert net.num_calls > calls
    assert rebuilt.path == first.path
    assert torch.allclose(rebuilt.mu, first.mu)  # the same images in another order
    calls = net.num_calls
    reference_stats(tmp_path, net, batch_size=16)
    assert net.num_calls == calls  # the new file is current again


def test_reference_stats_match_the_images_in_the_shards(tmp_path):
    write_tiny_shards(tmp_path)
    read = list(real_images(tmp_path, resolution=16, batch_size=16))
    assert [len(labels) for _, labels in read] == [16, 16, 8]
    images = torch.cat([i for i, _ in read])
    net = QuadrantNet()
    stats = reference_stats(tmp_path, net)
    features = net(images)[0].double()
    assert torch.allclose(stats.mu, features.mean(0)) and torch.allclose(stats.sigma, features.T.cov())
    assert torch.equal(stats.kid_features, features.float())  # all of them, in the shards' order


def test_reference_stats_need_a_finished_build(tmp_path):
    with pytest.raises(SpecError, match="no complete shard build"):
        reference_stats(tmp_path, QuadrantNet())


# ----- feature networks -----
def test_missing_inception_weights_are_a_user_error_naming_the_file_and_where_to_pass_it(tmp_path):
    missing = tmp_path / "nowhere" / INCEPTION_WEIGHTS
    with pytest.raises(SpecError) as info:
        load_feature_net(f"inception:{missing}", what="eval.features")
    issue = info.value.issues[0]
    assert str(missing) in issue.message and issue.path == "eval.features"
    assert INCEPTION_WEIGHTS in issue.hint and "inception:PATH" in issue.hint and "torch-fidelity" in issue.hint


def test_unknown_or_missing_feature_networks_are_user_errors(tmp_path):
    with pytest.raises(SpecError, match="unknown feature network 'incepton'"):
        load_feature_net("incepton")
    with pytest.raises(SpecError) as info:
        load_feature_net(f"demo:{tmp_path / 'none.safetensors'}")
    assert "just demo-data" in info.value.issues[0].hint
    not_a_classifier = tmp_path / "junk.safetensors"
    not_a_classifier.write_bytes(b"junk")
    with pytest.raises(SpecError, match="not a demo classifier"):
        load_feature_net(f"demo:{not_a_classifier}")


# ----- the demo classifier -----
@pytest.fixture
def demo_dir(demo_shards_with_classifier):
    """The demo shards and classifier, written by `python -m pipeline demo-data --out DIR` once per
    session and shared: read them, never write there."""
    return demo_shards_with_classifier


def test_demo_data_trains_the_classifier_to_high_held_out_accuracy(demo_dir, cli):
    record = json.loads((demo_dir / RECORD_FILE).read_text())
    assert record["held_out_accuracy"] >= 0.9
    assert record["num_held_out"] == len(record["held_out_positions"]) == round(0.2 * 1797)
    assert (demo_dir / WEIGHTS_FILE).is_file() and demo_classifier_ready(demo_dir)
    result = cli("demo-data", "--out", demo_dir)
    assert result.code == 0 and "demo classifier already there" in result.out


def test_demo_classifier_scores_real_digits_as_real_and_noise_as_noise(demo_dir):
    net = load_feature_net(f"demo:{demo_dir / WEIGHTS_FILE}")
    assert net.classes == CLASSES and net.checksum == json.loads((demo_dir / RECORD_FILE).read_text())["weights_sha256"]
    reference = reference_stats(demo_dir, net)
    assert reference.real_class_accuracy >= 0.95
    held_out = json.loads((demo_dir / RECORD_FILE).read_text())["held_out_positions"]
    images, labels = (torch.cat(t) for t in zip(*real_images(demo_dir, resolution=32), strict=True))
    scorer = Scorer(net, reference, **FAST)
    real = scorer(batches(images[held_out], labels[held_out]))
    assert real["class_accuracy"] >= 0.9
    noise = torch.randint(0, 256, images[held_out].shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fake = scorer(batches(noise, labels[held_out]))
    assert fake["fid"] > 20 * real["fid"] and fake["kid_mean"] > 20 * abs(real["kid_mean"])
    assert fake["class_accuracy"] < 0.5
    # digits at twice the size are resized back and classified as before
    upscaled = torch.nn.functional.interpolate(images[:200], scale_factor=2, mode="nearest-exact")
    assert (net(upscaled)[1].argmax(1) == net(images[:200])[1].argmax(1)).float().mean() >= 0.9


def test_demo_classifier_training_is_deterministic_and_tied_to_its_shards(demo_shards, copy_shards, tmp_path):
    copies = [copy_shards(demo_shards, tmp_path / "a"), copy_shards(demo_shards, tmp_path / "b")]
    first, second = (train_demo_classifier(copy, num_epochs=1) for copy in copies)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["held_out_positions"] == second["held_out_positions"]
    assert train_demo_classifier(copies[0], num_epochs=1, seed=1)["weights_sha256"] != first["weights_sha256"]
    assert demo_classifier_ready(copies[1])
    with open(copies[1] / "manifest.json", "a") as f:
        f.write(" ")  # another manifest: the classifier no longer matches its shards
    assert not demo_classifier_ready(copies[1])
