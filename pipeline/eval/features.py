"""Pluggable feature networks for FID, KID, IS and the class accuracy of conditional samples.

A `FeatureNet` maps uint8 images (N, 3, H, W) in 0..255 to pooled features (for FID and KID)
and class logits (for IS and the class accuracy) in one forward pass. What it is, its weights'
sha256 and how it resizes its input are recorded next to every score (`protocol()`).

`load_feature_net` takes one of:
  demo            the demo classifier at shards/demo/classifier.safetensors (`just demo-data` trains it)
  demo:PATH       a demo classifier saved elsewhere
  inception:PATH  the standard FID Inception-v3 (`pipeline.eval.inception`, written here: no torch-fidelity,
                  no torchvision) with the TensorFlow 2015-12-05 weights in torch-fidelity's file, from a
                  local path; nothing is downloaded at run time. Whether the file is the official one
                  (its sha256) is recorded in the protocol
  inception       the same, from where torch-fidelity itself caches the file (torch hub's checkpoints)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import DEMO_SHARDS
from pipeline.errors import user_error
from pipeline.eval.classifier import INPUT_SIZE, WEIGHTS_FILE, load_demo_classifier
from pipeline.eval.inception import INPUT_SIZE as INCEPTION_INPUT_SIZE
from pipeline.eval.inception import OFFICIAL_SHA256, load_fid_inception
from pipeline.eval.inception import WEIGHTS_FILE as INCEPTION_WEIGHTS
from pipeline.eval.inception import WEIGHTS_URL as INCEPTION_URL
from pipeline.safe_files import sha256

KINDS = ("demo", "inception")


class FeatureNet(nn.Module):
    """uint8 images (N, 3, H, W) -> (features (N, num_features), logits (N, num_classes)); never trains."""

    name: str
    checksum: str  # sha256 of the weights file
    input_size: int  # images are resized to input_size x input_size before the network sees them
    resize_filter: str
    num_features: int
    num_classes: int
    # {class name: logit index} of the dataset it was trained on; None when its classes are not a dataset's
    classes: dict[str, int] | None = None

    def train(self, mode: bool = True) -> FeatureNet:
        return super().train(False)

    def protocol(self) -> dict:
        return {
            "feature_net": self.name,
            "feature_net_sha256": self.checksum,
            "feature_net_input_size": self.input_size,
            "resize_filter": self.resize_filter,
        }


class DemoFeatureNet(FeatureNet):
    name = "demo-classifier"
    input_size = INPUT_SIZE
    resize_filter = f"bilinear with antialiasing (torch), only when the input is not {INPUT_SIZE}x{INPUT_SIZE}"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.net, self.classes = load_demo_classifier(path)
        # the demo's 32, or the side it was trained at on a user's shards
        size = self.input_size = self.net.input_size
        self.resize_filter = f"bilinear with antialiasing (torch), only when the input is not {size}x{size}"
        self.checksum = sha256(path)
        self.num_features, self.num_classes = self.net.num_features, self.net.num_classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.net(x)


class InceptionFeatureNet(FeatureNet):
    """The FID Inception-v3 (`pipeline.eval.inception`): pool3 (2048) features and the unbiased
    logits that IS uses, from torch-fidelity's weights file, read safely and checked."""

    name = "inception-v3-compat"
    input_size = INCEPTION_INPUT_SIZE
    # the resize the published TensorFlow FID and IS numbers used (torchmetrics' default antialias differs)
    resize_filter = "bilinear as TensorFlow 1.x, no antialiasing (as torch-fidelity)"
    num_features, num_classes = 2048, 1008

    def __init__(self, path: str | os.PathLike, *, what: str = "features"):
        super().__init__()
        self.net, self.checksum = load_fid_inception(path, what=what)
        self.official = self.checksum == OFFICIAL_SHA256

    def weights_note(self) -> str:
        if self.official:
            return "the official FID weights"
        return (
            f"NOT the official FID weights (sha256 {OFFICIAL_SHA256[:12]}...): "
            "scores are not comparable with published ones"
        )

    def protocol(self) -> dict:
        return super().protocol() | {"feature_net_official": self.official, "feature_net_weights": self.weights_note()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(images)


def default_inception_path() -> Path:
    """Where torch-fidelity caches the weights when it downloads them itself."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def load_feature_net(spec: str, device: str | torch.device = "cpu", *, what: str = "features") -> FeatureNet:
    """The feature network SPEC names (`demo`, `demo:PATH`, `inception:PATH`, `inception`), on DEVICE.

    `what` is the setting the user gave SPEC as, named in errors."""
    kind, _, given = spec.partition(":")
    if kind not in KINDS:
        raise user_error(
            f"unknown feature network {spec!r}", path=what, hint="give demo, demo:PATH, inception:PATH or inception"
        )
    if kind == "demo":
        path = Path(given or Path(DEMO_SHARDS) / WEIGHTS_FILE).expanduser()
        if not path.is_file():
            raise user_error(
                f"the demo classifier {path} does not exist",
                path=what,
                file=str(path),
                hint="plain `demo` trains it on the spec's shards when missing; `just demo-data` writes the demo's; "
                "or give demo:PATH of an existing one",
            )
        net: FeatureNet = DemoFeatureNet(path)
    else:
        path = Path(given).expanduser() if given else default_inception_path()
        if not path.is_file():
            raise user_error(
                f"the Inception weights file {path} does not exist",
                path=what,
                file=str(path),
                hint=f"download {INCEPTION_WEIGHTS} once from {INCEPTION_URL} and give its path as "
                f"inception:PATH (or put it at {default_inception_path()}); nothing is downloaded "
                "at run time",
            )
        net = InceptionFeatureNet(path, what=what)
    return net.to(device).eval().requires_grad_(False)
