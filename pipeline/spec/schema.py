"""The spec schema: pydantic models that forbid unknown keys. Each field is documented here once;
the JSON Schema (`python -m pipeline schema`) and the errors come from these docstrings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from pipeline.blocks import node_union
from pipeline.blocks.registry import Init, no_bool_for_a_number
from pipeline.methods import METHODS, method_union

NodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

# The discriminated unions of the registered block kinds and methods are built at import; to a type
# checker, each is their base class.
if TYPE_CHECKING:
    from pipeline.blocks.registry import Node as AnyNode
    from pipeline.methods.registry import Method as AnyMethod
else:
    AnyNode = node_union()
    AnyMethod = method_union()


class Section(BaseModel):
    # inf and nan are never meaningful settings (an infinite learning rate trains to NaN and
    # writes non-finite weights into checkpoints): refused for every float of the schema
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    refuse_bool_for_a_number = field_validator("*", mode="before")(classmethod(no_bool_for_a_number))


Beta = Annotated[float, Field(ge=0, lt=1)]

_IMAGES = {"": 1, "k": 1000, "M": 1000_000}


def _interval(value):
    # steps (500), or images as progress is counted: "6400img", "64kimg", "2Mimg"
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(k|M)?img\s*", value)
        if not match or int(match[1]) == 0:
            raise ValueError(f"{value!r} is not an interval: give steps (500) or images (6400img, 64kimg, 2Mimg)")
        return f"{int(match[1]) * _IMAGES[match[2] or '']}img"
    return value


Interval = Annotated[PositiveInt | str, BeforeValidator(_interval)]


def due(every, step: int, images_before: int, images_after: int) -> bool:
    """Whether an interval (steps, or "Nimg") has come round in the step that took the images seen
    from `images_before` to `images_after`."""
    if isinstance(every, int):
        return step % every == 0
    n = int(every.removesuffix("img"))
    return images_after // n > images_before // n


def _as_list(v):
    return [v] if isinstance(v, str) else v


class InputSpec(Section):
    """One input of a network: a latent vector, class labels, or an image."""

    kind: Literal["latent", "labels", "image"] = Field(
        description="latent: a vector of latent.z_dim (or `size`); labels: class indices (data.num_classes); "
        "image: channels x resolution x resolution (data's unless given)."
    )
    size: PositiveInt | None = Field(None, description="latent: its dimension; default latent.z_dim.")
    channels: PositiveInt | None = Field(None, description="image: its channels; default data.channels.")
    resolution: PositiveInt | None = Field(None, le=8192, description="image: its side; default data.resolution.")
    stream: str | None = Field(None, description="image: the data stream its real images come from, if any.")


def _input_shorthand(v):
    # `z: latent`, `y: labels`, `image: image`, or `image: image:STREAM`
    if isinstance(v, str):
        kind, _, stream = v.partition(":")
        return {"kind": kind, **({"stream": stream} if stream else {})}
    return v


class OptimizerSpec(Section):
    kind: Literal["adam", "sgd"] = Field(
        "adam", description="adam (everywhere, ganhacks tip 9), or sgd (the tip's alternative for D)."
    )
    lr: PositiveFloat = Field(description="Learning rate.")
    betas: tuple[Beta, Beta] = Field((0.0, 0.999), description="Adam betas, each in [0, 1).")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (sgd only).")
    fused: bool = Field(
        False,
        description="Adam's fused implementation (torch.optim.Adam(fused=True)): one kernel over every parameter, "
        "faster on GPUs, equal to the default up to rounding (adam only).",
    )

    @model_validator(mode="after")
    def _momentum_is_sgd(self):
        if self.momentum and self.kind != "sgd":
            raise ValueError("momentum is an option of kind: sgd; Adam's are betas and eps")
        if self.fused and self.kind != "adam":
            raise ValueError("fused is an option of kind: adam")
        return self


class EmaSpec(Section):
    decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay of the network's weights.")
    start_images: int = Field(0, ge=0, description="Images seen before the EMA starts (before: a copy).")


class NetworkSpec(Section):
    """A network as a DAG of named nodes. The shorthand `generator:` takes `z` (latent.z_dim) and
    `y` (class labels); `discriminator:` takes `image` (data.channels x resolution x resolution)
    and `y`. A network under `networks:` declares its inputs, or takes those its method gives it."""

    inputs: dict[NodeName, Annotated[InputSpec, BeforeValidator(_input_shorthand)]] = Field(
        default_factory=dict,
        description=(
            "Named inputs in call order: `latent`, `labels`, `image` or `image:STREAM`, or a mapping "
            "({kind: image, channels: 3, resolution: 64}); default: what the method gives a network of its role."
        ),
    )
    opt: OptimizerSpec | None = Field(
        None, description="This network's Adam settings; default train.g_opt or train.d_opt by its role."
    )
    ema: EmaSpec | None = Field(
        None, description="An EMA of this network's weights; default: train.ema for the gan method's generator."
    )
    nodes: dict[NodeName, AnyNode] = Field(
        description=(
            "Named nodes, each with a `kind` from the block registry, its inputs (`in`, `cond`, `y`) "
            "by name and the parameters of its kind."
        )
    )
    output: Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1)] = Field(
        description=(
            "Output node(s). The generator's first output is the image; the discriminator's first is "
            "one logit per image, further ones (e.g. U-Net per-pixel logits) may follow."
        )
    )
    init: Init = Field(
        "orthogonal",
        description="Weight init: orthogonal, normal (N(0, 0.02)), xavier, "
        "equalized_lr (N(0, 1) scaled at run time by sqrt(2/fan_in)), msr (N(0, gain²/fan_in), the block's "
        "activation gain, 1 unless the block says: R3GAN's) or default (torch's).",
    )
    sn: bool = Field(False, description="Spectral norm on every conv, linear and embedding (nodes may override).")
    sn_eps: PositiveFloat = Field(1e-6, description="Epsilon of spectral norm's power iteration.")
    bn_eps: PositiveFloat = Field(1e-5, description="BatchNorm epsilon.")
    bn_momentum: float = Field(0.1, gt=0, le=1, description="BatchNorm running-statistics momentum.")
    cross_replica_bn: bool = Field(False, description="Synchronize BatchNorm statistics across data-parallel ranks.")
    grow: NodeName | None = Field(
        None,
        description=(
            "Progressive growing (ProGAN): a node repeated N times whose instances are the stages of the network. "
            "Stage 0 runs none of them, stage k the k nearest the image. The nodes between that node and the image "
            "(a generator's to_rgb after it; a discriminator's from_rgb before it) are built once per stage. "
            "During a stage's fade-in, the previous stage's path (its image up- or down-sampled 2x) is blended "
            "with the new one by alpha. The method `progressive` sets the stage and alpha."
        ),
    )

    def reads_labels(self) -> bool:
        """Whether a node takes the class labels (the shorthand's `y`, or an input of kind labels): a
        class-conditional network. An unconditional one is given labels and ignores them."""
        labels = [name for name, given in self.inputs.items() if given.kind == "labels"] or ["y"]
        return any(
            ref.partition(".")[0] in labels
            for node in self.nodes.values()
            for refs in node.refs().values()
            for ref in refs
        )


class LatentSpec(Section):
    z_dim: PositiveInt = Field(description="Dimension of the latent vector z, the generator input `z`.")
    distribution: Literal["normal", "uniform"] = Field(
        "normal",
        description="p(z): N(0, 1), or U(-1, 1) (LOGAN's choice, consistent with clipping the optimised latent).",
    )


class AugmentSpec(Section):
    crop: Literal["random_resized", "center", "random"] = Field(
        "center", description="random_resized crop, or resize of the shorter side then a center/random crop."
    )
    area: tuple[float, float] = Field((0.08, 1.0), description="Range of the image area a random_resized crop keeps.")
    flip: bool = Field(True, description="Random horizontal flips.")
    load_size: PositiveInt | None = Field(
        None,
        le=8192,
        description="Resize every image to load_size x load_size (the aspect ratio not kept) before the center or "
        "random crop to data.resolution, as CycleGAN's resize_and_crop (load 286, crop 256); null: resize the "
        "shorter side to data.resolution.",
    )

    @model_validator(mode="after")
    def _load_size_with_a_crop(self):
        if self.load_size is not None and self.crop == "random_resized":
            raise ValueError("load_size applies to the center and random crops, not random_resized")
        return self


class StreamSpec(Section):
    """A named set of real images, read by its own DALI pipeline (its position is checkpointed)."""

    shards: str | None = Field(None, description="WebDataset shards: a directory, a file or a glob of .tar files.")
    synthetic: bool = Field(False, description="Random images (and labels) instead of shards.")


class DataSpec(Section):
    resolution: PositiveInt = Field(
        le=8192, description="Image side in pixels (at most 8192): the generator output and discriminator input."
    )
    channels: PositiveInt = Field(3, description="Image channels.")
    num_classes: PositiveInt | None = Field(
        None, description="Number of classes; labels are 0 .. num_classes - 1 (none for unlabelled data)."
    )
    shards: str | None = Field(
        None, description="WebDataset shards of the stream `images`: a directory, a file or a glob of .tar files."
    )
    synthetic: bool = Field(
        False,
        description="Random images and labels instead of shards (measuring the model "
        "alone; checking distributed training).",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    shuffle_buffer: PositiveInt = Field(
        1024,
        description="Samples in DALI's shuffle buffer (shards are shuffled when written; this only mixes neighbours).",
    )
    num_threads: PositiveInt | None = Field(None, description="DALI CPU threads per rank; default: all cores.")
    on_bad_sample: Literal["error", "skip"] = Field(
        "error",
        description=(
            "A sample missing its .cls, with a non-integer label or one outside num_classes: stop with an error "
            "naming its shard and key, or skip it (counted, logged as data_skipped). Also decides what a shard "
            "whose SHA-256 no longer matches the manifest does (each shard is hashed in the background during "
            "the first pass): stop the run naming it, or warn and train on. A JPEG DALI cannot decode always "
            "stops the run (DALI cannot replace one sample of a batch)."
        ),
    )
    max_bad_samples: NonNegativeInt = Field(
        1000,
        description=(
            "With on_bad_sample: skip, the run stops once more samples than this were skipped (all ranks, all "
            "streams): data that damaged needs rebuilding, not skipping."
        ),
    )
    streams: dict[NodeName, StreamSpec] = Field(
        default_factory=dict,
        description=(
            "Named image streams (e.g. one per domain for an image-to-image method); default: one stream "
            "`images` read from data.shards (or synthetic). Resolution, augmentation and reader settings above "
            "apply to every stream."
        ),
    )

    @model_validator(mode="after")
    def _one_way_to_name_the_data(self):
        if self.streams and (self.shards or self.synthetic):
            raise ValueError("give data.shards / data.synthetic or data.streams, not both")
        if self.augment.load_size is not None and self.augment.load_size < self.resolution:
            raise ValueError(
                f"augment.load_size {self.augment.load_size} is smaller than resolution {self.resolution}: the "
                "crop would not fit; give a load size of at least the resolution"
            )
        return self

    def all_streams(self) -> dict[str, StreamSpec]:
        """Every stream by name: `streams`, or the one stream `images` of data.shards."""
        return dict(self.streams) or {"images": StreamSpec(shards=self.shards, synthetic=self.synthetic)}


# Keys of `train:` that are options of the gan method since methods became data
MOVED_TO_METHOD = ("loss", "d_steps", "label_smoothing", "label_flip", "ortho_reg", "r1_gamma", "gp_weight")


def upgrade_stored(data: dict) -> dict:
    """A spec as runs, checkpoints and exports stored it before `method:` existed, in today's
    layout: the gan options of `train:` move into `method`. Current specs pass unchanged."""
    train = data.get("train")
    if not isinstance(train, dict) or "method" in data or not set(MOVED_TO_METHOD) & set(train):
        return data
    moved = {k: train[k] for k in MOVED_TO_METHOD if k in train}
    return data | {"train": {k: v for k, v in train.items() if k not in moved}, "method": {"kind": "gan", **moved}}


class RollbackSpec(Section):
    lr_scale: float = Field(
        0.5,
        gt=0,
        le=1,
        description="At each rollback, the learning rates of the networks whose gradient norm fired are multiplied "
        "by this (every network's when another detector fired).",
    )
    reseed: bool = Field(True, description="Draw the latents from a new seed after a rollback.")


class FailureSpec(Section):
    """Failure tracking (ganhacks tip 10): detectors over each logged line (pipeline/train/failures.py)."""

    on_failure: Literal["off", "warn", "stop", "rollback"] = Field(
        "warn",
        description=(
            "warn: a line in metrics.jsonl and a message; stop: stop like a NaN loss, naming the last good "
            "checkpoint; rollback: reload the newest checkpoint from before the symptom began, apply `rollback`, "
            "continue (at most max_rollbacks times, then stop); off: no detectors."
        ),
    )
    intervals: PositiveInt = Field(3, description="Logged lines a symptom must last (D loss at 0, G fooling D).")
    d_loss_below: NonNegativeFloat = Field(1e-3, description="A D loss at or below this counts as 0.")
    grad_norm_change: float | None = Field(
        10.0,
        gt=1,
        description="A gradient norm more than this many times above, or below 1/this of, the median of its last "
        "10 healthy logged values is a failure (judged once grad_norm_warmup values are known; null: off). "
        "Healthy demo runs stayed within 5x (one noisy line of a U-Net G: 9x); a D learning rate raised 25x "
        "made D's gradient norm fall 14x.",
    )
    grad_norm_warmup: PositiveInt = Field(5, description="Logged values of a gradient norm before it is judged.")
    grad_norm_above: PositiveFloat | None = Field(
        None,
        description="A gradient norm above this is a failure, whatever the run's history (the tip's figure is 100; "
        "off by default: the demo's D starts at 112 at batch 8, healthy).",
    )
    g_fooling: bool = Field(True, description="Detect D scoring fakes above reals while G's loss falls.")
    diversity_below: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Mode collapse: the fixed-latent samples' mean pairwise distance below this fraction of its "
        "first value, e.g. 0.25 (0: off; off by default: an EMA that starts mid-run can fall below 0.25 of an "
        "untrained generator's noise without collapsing).",
    )
    max_rollbacks: NonNegativeInt = Field(3, description="Rollbacks before the run stops instead.")
    rollback: RollbackSpec = Field(default_factory=RollbackSpec)


ZERO_3_REFUSED = (
    "ZeRO stage 3 is not supported: it partitions the parameters themselves, and the EMA update, the exported "
    "and checkpointed weights, sampling and evaluation read every network whole on every rank (under stage 3 "
    "the first EMA update fails on a partitioned weight). What stage 3 would save is one copy of the fp32 weights "
    "per rank: 377 MB for the largest shipped spec (biggan_deep_512, G and D 94.3M parameters); stage 2 already "
    "partitions the optimizer states (twice that) and the gradients. Use train.zero_stage=2"
)


class TrainSpec(Section):
    @model_validator(mode="before")
    @classmethod
    def _moved_to_method(cls, data):
        if isinstance(data, dict):
            moved = [k for k in MOVED_TO_METHOD if k in data]
            if moved:
                keys = ", ".join(f"train.{k}" for k in moved)
                raise ValueError(
                    f"{keys}: option(s) of the training method now; write them under `method:` (e.g. "
                    f"method: {{kind: gan, {moved[0]}: ...}}, or method.{moved[0]}=... on the command line)"
                )
        return data

    batch_size: PositiveInt = Field(256, description="Global batch = batch_per_rank x grad_accum x world size.")
    batch_per_rank: PositiveInt | None = Field(
        None,
        description="Samples per micro-batch (one forward and backward) on each rank; default: batch_size / ranks, "
        "no accumulation. Smaller: gradients accumulate over batch_size / (batch_per_rank x ranks) micro-batches "
        "per step, the same batch in less memory (`validate gpus=N` estimates what fits).",
    )
    g_opt: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(lr=1e-4), description="Adam of the networks in the generator role."
    )
    d_opt: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(lr=4e-4), description="Adam of the networks in the discriminator role."
    )
    ema: EmaSpec | None = Field(
        default_factory=EmaSpec, description="EMA of the gan method's generator; null for none."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "bf16: torch.autocast (convolutions and matrix products in bf16; norms, losses, master weights and "
            "optimizer states in fp32) and bf16 images from the loader."
        ),
    )
    zero_stage: Literal[0, 1, 2] = Field(
        0,
        description="DeepSpeed ZeRO stage: 1 partitions optimizer states over the ranks, 2 also gradients; 3 "
        "(parameters too) is refused, see README.",
    )
    max_steps: PositiveInt = Field(100_000, description="Steps of the run (each: every phase of the method once).")

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _no_zero_3(cls, v):
        if v == 3 and not isinstance(v, bool):
            raise ValueError(ZERO_3_REFUSED)
        return v

    log_every: Interval = Field(10, description="Steps (or images: 64kimg) between lines of metrics.jsonl.")
    sample_every: Interval = Field(500, description="Steps (or images: 640kimg) between sample grids.")
    checkpoint_every: Interval = Field(
        1000,
        description="Steps (or images: 1Mimg) between checkpoints (one is also written at the end and on Ctrl-C).",
    )
    keep_checkpoints: PositiveInt = Field(3, description="Checkpoints kept; older ones are deleted.")
    failures: FailureSpec = Field(default_factory=FailureSpec, description="Failure tracking and what it does.")
    init_from: str | None = Field(
        None,
        description=(
            "Start from these weights instead of a random init: an export directory (a run's RUN/export, a run "
            "directory, or `import-weights`' output). Each network takes NAME-train.safetensors, else "
            "NAME.safetensors (an EMA where the source kept one); its EMA takes NAME.safetensors; a network "
            "with neither starts at random. Optimizers start afresh at step 0. Ignored when the run has "
            "checkpoints (it resumes from them)."
        ),
    )
    init_classes: Literal["slice", "reinit"] | None = Field(
        None,
        description=(
            "With init_from from a source with another data.num_classes: slice keeps the class embeddings' "
            "first rows (fewer classes only); reinit leaves them at the random init. Required when the counts differ."
        ),
    )


STANDING_STATS_PASSES = 16
"""Forward passes of standing BatchNorm statistics before sampling when neither the spec nor a flag
says otherwise: BigGAN's sampling protocol, and what BENCHMARKS.md's demo numbers use."""


class EvalSpec(Section):
    """Evaluation during training, and the protocol `eval` and `sample` score a run with by default."""

    every: int = Field(
        0,
        ge=0,
        description=(
            "Evaluate FID, KID, IS and class accuracy of the generator (the EMA's when there is one) at step 0, "
            "every this many steps and at the end, logged to metrics.jsonl; 0: never during training."
        ),
    )
    num_samples: int = Field(1000, ge=2, description="Generated images per evaluation (classes balanced).")
    features: str = Field(
        "demo",
        description=(
            "Feature network: demo (the classifier beside the spec's shards, trained on demand), demo:PATH, "
            "or inception:PATH (the standard FID Inception weights, a local file)."
        ),
    )
    truncation: float | None = Field(None, gt=0, description="Truncation threshold of z; null: none.")
    standing_stats: int = Field(
        STANDING_STATS_PASSES,
        ge=0,
        description=(
            "Forward passes of standing BatchNorm statistics before sampling (BigGAN's protocol); 0: the running "
            "statistics. `eval` and `sample` of the run use it unless given --standing-stats."
        ),
    )

    # `eval.every: null` and `eval: null` are what people write for "off" (null was the only
    # spelling once, so stored specs hold it): both mean what 0 means
    @field_validator("every", mode="before")
    @classmethod
    def _null_every_is_never(cls, value):
        return 0 if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _null_section_is_never(cls, data):
        return {"every": 0} if data is None else data


class RunSpec(Section):
    dir: str | None = Field(None, description="Run directory; default runs/NAME. Re-running resumes from it.")
    collective_timeout_s: float = Field(
        1800,
        gt=0,
        le=86400,
        description="Seconds a rank waits in a collective (gradient all-reduce, barrier) for the others before "
        "the run stops with an error: a hung rank or node then ends the run instead of holding it forever. Above "
        "the longest first-step compilation.",
    )


class CompileSpec(Section):
    """How the networks run: torch.compile and the memory format. A resumed run may change these."""

    enabled: bool = Field(False, description="torch.compile the networks.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode."
    )
    fullgraph: bool = Field(False, description="Fail instead of falling back to eager on graph breaks.")
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description=(
            "torch.compile backend: inductor generates fused kernels (`mode` applies to it); aot_eager and eager "
            "only trace, running the traced graphs with PyTorch's own kernels (to tell a tracing problem from an "
            "inductor one, or to check recompilations quickly)."
        ),
    )
    scope: Literal["regional", "whole"] = Field(
        "regional",
        description=(
            "regional: compile each node's module (each instance of a repeated node) on its own, so that blocks "
            "of one structure share one compiled graph (BigGAN-deep repeats its blocks); whole: trace each network "
            "as one graph (slower to compile, free to fuse across nodes)."
        ),
    )
    channels_last: bool = Field(
        True,
        description=(
            "Run the feature maps in channels-last (NHWC) memory format, which oneDNN (CPU) and cuDNN (GPU) "
            "convolve faster than NCHW; with compile or without. The weights keep their layout."
        ),
    )


def _compile_shorthand(v):
    return {"enabled": v} if isinstance(v, bool) else v


def _method_shorthand(v):
    return {"kind": v} if isinstance(v, str) else v


class Spec(Section):
    """A GAN: its training method, networks, latent, data, training and compile settings."""

    name: str = Field(description="Name of the spec (default: the file name); runs go to runs/NAME.")
    base: str | None = Field(
        None,
        description=(
            "A spec in specs/ this one extends: mappings merge key by key, other values replace, a node "
            "whose kind changes is replaced whole, and `null` in place of a node or section removes it, "
            "except where null has a meaning of its own (`train.ema: null`, `eval: null`)."
        ),
    )
    description: str = Field("", description="One line on what this spec is and where its numbers come from.")
    seed: int = Field(0, ge=0, lt=2**63, description="Random seed (0 to 2^63 - 1).")
    method: Annotated[AnyMethod, BeforeValidator(_method_shorthand)] = Field(
        default_factory=lambda: METHODS["gan"](),
        description="The training method: a registered kind (" + ", ".join(METHODS) + ") and its options; "
        "`method: gan` is short for {kind: gan}.",
    )
    latent: LatentSpec | None = Field(None, description="The latent z of the generators that take one.")
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    compile: Annotated[CompileSpec, BeforeValidator(_compile_shorthand)] = Field(
        default_factory=CompileSpec, description="torch.compile settings; `compile: true` is short for enabled."
    )
    generator: NetworkSpec | None = Field(None, description="Shorthand for the network `generator` (inputs z, y).")
    discriminator: NetworkSpec | None = Field(
        None, description="Shorthand for the network `discriminator` (inputs image, y)."
    )
    networks: dict[NodeName, NetworkSpec] = Field(
        default_factory=dict, description="Further named networks, each a block graph with declared inputs."
    )

    @model_validator(mode="after")
    def _networks_of_the_method(self):
        names = [n for n in ("generator", "discriminator") if getattr(self, n) is not None]
        twice = [n for n in names if n in self.networks]
        if twice:
            raise ValueError(f"network {twice[0]!r} is declared both as `{twice[0]}:` and under `networks:`")
        return self

    def all_networks(self) -> dict[str, NetworkSpec]:
        """Every declared network by name: the shorthands first, then `networks:`."""
        shorthand = {n: getattr(self, n) for n in ("generator", "discriminator") if getattr(self, n) is not None}
        return shorthand | dict(self.networks)

    def ema_of(self, name: str) -> EmaSpec | None:
        """The EMA kept of a network: its own `ema`, else `train.ema` for a network the method exports."""
        own = self.all_networks()[name].ema
        return own or (self.train.ema if name in self.method.exports(self) else None)

    def opt_of(self, name: str) -> OptimizerSpec:
        """A network's Adam: its own `opt`, else train.g_opt or train.d_opt by its role in the method."""
        role = self.method.networks(self)[name].role
        return self.all_networks()[name].opt or (self.train.g_opt if role == "generator" else self.train.d_opt)

    def network_path(self, name: str) -> str:
        """The spec path of a network's section: `generator` for a shorthand, `networks.NAME` otherwise."""
        return (
            name if name in ("generator", "discriminator") and getattr(self, name) is not None else f"networks.{name}"
        )

    @property
    def run_dir(self) -> Path:
        """Where the run lives: `run.dir`, by default runs/NAME (relative to the working directory)."""
        return Path(self.run.dir or f"runs/{self.name}")

    def resolved(self) -> dict:
        """The spec as stored in runs, checkpoints and exports: plain data with YAML's key names
        (`in`, not `in_`) and its bases already merged, so `load_spec` reads it back as it is."""
        return self.model_dump(mode="json", by_alias=True) | {"base": None}
