"""The spec schema: pydantic models that forbid unknown keys. Each field is documented here once;
the JSON Schema (`python -m pipeline schema`) and the errors come from these docstrings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from pipeline.blocks import node_union
from pipeline.blocks.registry import Init, no_bool_for_a_number
from pipeline.eval.protocol import STANDING_STATS_PASSES

NodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Section(BaseModel):
    # inf and nan are never meaningful settings (an infinite learning rate trains to NaN and
    # writes non-finite weights into checkpoints): refused for every float of the schema
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    refuse_bool_for_a_number = field_validator("*", mode="before")(classmethod(no_bool_for_a_number))


Beta = Annotated[float, Field(ge=0, lt=1)]


def _as_list(v):
    return [v] if isinstance(v, str) else v


class NetworkSpec(Section):
    """A network as a DAG of named nodes. The generator's inputs are `z` (latent.z_dim) and `y`
    (class labels); the discriminator's are `image` (data.channels x resolution x resolution) and `y`."""

    nodes: dict[NodeName, node_union()] = Field(
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
        "equalized_lr (N(0, 1) scaled at run time by sqrt(2/fan_in)) or default (torch's).",
    )
    sn: bool = Field(False, description="Spectral norm on every conv, linear and embedding (nodes may override).")
    sn_eps: PositiveFloat = Field(1e-6, description="Epsilon of spectral norm's power iteration.")
    bn_eps: PositiveFloat = Field(1e-5, description="BatchNorm epsilon.")
    bn_momentum: float = Field(0.1, gt=0, le=1, description="BatchNorm running-statistics momentum.")
    cross_replica_bn: bool = Field(False, description="Synchronize BatchNorm statistics across data-parallel ranks.")


class LatentSpec(Section):
    z_dim: PositiveInt = Field(description="Dimension of the latent vector z, the generator input `z`.")


class AugmentSpec(Section):
    crop: Literal["random_resized", "center", "random"] = Field(
        "center", description="random_resized crop, or resize of the shorter side then a center/random crop."
    )
    area: tuple[float, float] = Field((0.08, 1.0), description="Range of the image area a random_resized crop keeps.")
    flip: bool = Field(True, description="Random horizontal flips.")


class DataSpec(Section):
    resolution: PositiveInt = Field(
        le=8192, description="Image side in pixels (at most 8192): the generator output and discriminator input."
    )
    channels: PositiveInt = Field(3, description="Image channels.")
    num_classes: PositiveInt = Field(description="Number of classes; labels are 0 .. num_classes - 1.")
    shards: str | None = Field(None, description="WebDataset shards: a directory, a file or a glob of .tar files.")
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
            "naming its shard and key, or skip it (counted)."
        ),
    )


class OptimizerSpec(Section):
    lr: PositiveFloat = Field(description="Adam learning rate.")
    betas: tuple[Beta, Beta] = Field((0.0, 0.999), description="Adam betas, each in [0, 1).")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")


class EmaSpec(Section):
    decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay of the generator's weights.")
    start_images: int = Field(0, ge=0, description="Images seen before the EMA starts (before: a copy).")


class TrainSpec(Section):
    loss: Literal["hinge", "non_saturating", "wgan_gp", "least_squares"] = Field("hinge", description="GAN loss.")
    d_steps: PositiveInt = Field(1, description="Discriminator steps per generator step.")
    batch_size: PositiveInt = Field(256, description="Global batch = batch_per_rank x grad_accum x world size.")
    batch_per_rank: PositiveInt | None = Field(None, description="Micro-batch per rank; default: batch_size.")
    g_opt: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(lr=1e-4))
    d_opt: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(lr=4e-4))
    ema: EmaSpec | None = Field(default_factory=EmaSpec, description="EMA of G; null for none.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="non_saturating: one-sided label smoothing of "
        "D's real targets (1 - smoothing; Salimans et al. 2016).",
    )
    label_flip: float = Field(
        0.0, ge=0, le=1, description="non_saturating: probability of flipping each of D's real/fake targets."
    )
    ortho_reg: float = Field(
        0.0,
        ge=0,
        description=(
            "BigGAN's modified orthogonal regularization beta * ||W W^T * (1 - I)||_F^2 (0: off); BigGAN-PyTorch's "
            "--G_ortho strength s corresponds to beta = s / 2."
        ),
    )
    r1_gamma: float = Field(0.0, ge=0, description="R1 penalty weight on real images (Mescheder et al. 2018; 0: off).")
    gp_weight: float = Field(0.0, ge=0, description="WGAN-GP gradient penalty weight (10 in Gulrajani et al.; 0: off).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "bf16: torch.autocast (convolutions and matrix products in bf16; norms, losses, master weights and "
            "optimizer states in fp32) and bf16 images from the loader."
        ),
    )
    zero_stage: Literal[0, 1, 2] = Field(0, description="DeepSpeed ZeRO stage.")
    max_steps: PositiveInt = Field(100_000, description="Generator steps of the run.")
    log_every: PositiveInt = Field(10, description="Generator steps between lines of metrics.jsonl.")
    sample_every: PositiveInt = Field(500, description="Generator steps between sample grids.")
    checkpoint_every: PositiveInt = Field(
        1000, description="Generator steps between checkpoints (one is also written at the end and on Ctrl-C)."
    )
    keep_checkpoints: PositiveInt = Field(3, description="Checkpoints kept; older ones are deleted.")


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


class CompileSpec(Section):
    enabled: bool = Field(False, description="torch.compile the generator and the discriminator.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode."
    )
    fullgraph: bool = Field(False, description="Fail instead of falling back to eager on graph breaks.")


def _compile_shorthand(v):
    return {"enabled": v} if isinstance(v, bool) else v


class Spec(Section):
    """A GAN: its two networks, latent, data, training and compile settings."""

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
    latent: LatentSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    compile: Annotated[CompileSpec, BeforeValidator(_compile_shorthand)] = Field(
        default_factory=CompileSpec, description="torch.compile settings; `compile: true` is short for enabled."
    )
    generator: NetworkSpec
    discriminator: NetworkSpec

    @property
    def run_dir(self) -> Path:
        """Where the run lives: `run.dir`, by default runs/NAME (relative to the working directory)."""
        return Path(self.run.dir or f"runs/{self.name}")

    def resolved(self) -> dict:
        """The spec as stored in runs, checkpoints and exports: plain data with YAML's key names
        (`in`, not `in_`) and its bases already merged, so `load_spec` reads it back as it is."""
        return self.model_dump(mode="json", by_alias=True) | {"base": None}
