"""DeepMind's TF-Hub BigGAN-deep generators (128, 256, 512) as the PyPI package
pytorch-pretrained-biggan 0.1.1 publishes them: `pytorch_model.bin`, the `state_dict()` of its
`BigGAN` module (written by its `convert_tf_to_pytorch.py` from the TF-Hub modules
deepmind/biggan-deep-{128,256,512}/1), converted to the generator of the specs
`biggan_deep_{128,256,512}_tfhub`.

The facts below are read from the package's `model.py` (classes `BigGAN`, `Generator`, `GenBlock`,
`BigGANBatchNorm`, `SelfAttn`) and `convert_tf_to_pytorch.py`; none of its code is used here:

- `embeddings.weight` (z_dim x num_classes): a bias-free linear on one-hot classes, no spectral
  norm; our embedding's table is its transpose.
- Spectral norm is torch's `nn.utils.spectral_norm` (format version 1): `W_orig`, `W_u` (rows)
  and `W_v` (columns) stored, sigma = u . (W v) with the stored vectors in eval (no power
  iteration), which is what our `SpectralNorm` computes in eval; the three map one to one.
- `generator.gen_z` reshapes its output as (4, 4, 16·ch), TensorFlow's (h, w, c) order; our
  reshape reads (c, h, w), so its rows (and u) are reordered, which leaves sigma unchanged.
- Block `generator.layers.I` has `bn_0..3` (conditional: `scale` -> our `gain`, `offset` -> our
  `bias`, both spectrally normalised linears) and `conv_0..3`; our `bn1..4` and `conv1..4`.
  The attention layer sits among the blocks (`snconv1x1_theta/phi/g/o_conv`, `gamma`).
- BatchNorm in eval uses standing statistics stored per truncation: `running_means` and
  `running_vars` of (n_stats = 51) x C, row i for truncation i / 50. Our BatchNorm holds one set,
  chosen here for one truncation as the package chooses it (`stats_at`).
- The final BatchNorm has a gain and a bias (`generator.bn.weight/bias`); `conv_to_rgb` maps to
  ch channels and the image is the first 3 (our g_output's `conv_channels`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.errors import user_error
from pipeline.graph import NetworkPlan, analyze_network, instantiate
from pipeline.safe_files import read_torch
from pipeline.spec import LoadedSpec, Spec
from pipeline.spec.yaml_io import SourceMap

WEIGHTS_NAME = "pytorch_model.bin"  # the package's file name (model.py: WEIGHTS_NAME)
# what `pipeline.weights` (the formats' registry) reads of this format
FILES = {"G": WEIGHTS_NAME}
HOLDS = "the generator of TF-Hub's BigGAN-deep 128, 256 or 512 (DeepMind released its EMA weights)"
LACKS = (
    "a discriminator (TF-Hub published none: fine-tuning starts D at random) and BatchNorm statistics "
    "for more than one truncation (those at 1.0 are kept)"
)
TFHUB_EPS = 1e-4  # the package's config.eps for every released size: BatchNorm's epsilon
DEFAULT_TRUNCATION = 1.0
BOTTOM = 4  # the fc's output is (4, 4, 16·ch) in every released size
SPEC_FOR_BLOCKS = {10: "biggan_deep_128_tfhub", 12: "biggan_deep_256_tfhub", 14: "biggan_deep_512_tfhub"}
HINT = "use the spec of the weights' size: biggan_deep_128_tfhub, biggan_deep_256_tfhub or biggan_deep_512_tfhub"


# ----- reading -----
def check(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a pytorch-pretrained-biggan `pytorch_model.bin` (or a folder holding one),
    read with torch's weights-only unpickler, checked to be that package's BigGAN-deep format."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise user_error(
            f"{file} does not exist",
            hint=f"give the {WEIGHTS_NAME} of pytorch-pretrained-biggan (biggan-deep-128, -256 or -512), or its folder",
        )
    state = read_torch(file, map_location="cpu")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise user_error(f"{file} is not a state dict (a mapping of names to tensors)")
    for key in ("embeddings.weight", "generator.gen_z.weight_orig", "generator.conv_to_rgb.weight_orig"):
        if key not in state:
            raise user_error(
                f"{file} is not pytorch-pretrained-biggan's BigGAN-deep: it has no {key}",
                hint="expected the state dict of pytorch_pretrained_biggan.BigGAN (its pytorch_model.bin)",
            )
    return dict(state)


def _their_layers(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(kind, key prefix) of `generator.layers.I`, in order: "block" or "attention"."""
    indices = sorted({int(k.split(".")[2]) for k in state if k.startswith("generator.layers.")})
    out = []
    for i in indices:
        prefix = f"generator.layers.{i}"
        out.append(("attention" if f"{prefix}.gamma" in state else "block", prefix))
    return out


def spec_name(state: dict[str, torch.Tensor]) -> str:
    """The shipped spec of these weights' size, told by their number of blocks."""
    blocks = sum(kind == "block" for kind, _ in _their_layers(state))
    if blocks not in SPEC_FOR_BLOCKS:
        raise user_error(f"the weights have {blocks} generator blocks; the released sizes have 10, 12 or 14")
    return SPEC_FOR_BLOCKS[blocks]


# ----- batch norm statistics per truncation -----
def stats_at(table: torch.Tensor, truncation: float) -> torch.Tensor:
    """The row of a (n_stats x C) table of standing statistics that the package uses at
    `truncation`, computed with its operations (`BigGANBatchNorm.forward`): with
    step = 1 / (n_stats - 1), coef, i = modf(truncation / step); row i where coef is 0, else
    row i * coef + row i+1 * (1 - coef). (The package weighs row i by coef, not 1 - coef: a
    truncation just above a grid point takes nearly the next row's statistics. Kept, since the
    images must be the package's.)"""
    n = table.shape[0]
    if not 0 < truncation <= 1:
        raise user_error(f"truncation {truncation} is outside (0, 1], the range TF-Hub's statistics cover")
    coef, start = math.modf(truncation / (1.0 / (n - 1)))
    i = int(start)
    if coef == 0.0:
        return table[i].clone()
    if i + 1 >= n:  # a rounding just past the last row (the package would fail there)
        return table[n - 1].clone()
    return table[i] * coef + table[i + 1] * (1 - coef)


# ----- the key map -----
def _sn(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    """A spectrally normalised weight: torch's spectral_norm keys -> our parametrization's."""
    yield f"{ours}.parametrizations.weight.original", f"{theirs}.weight_orig"
    yield f"{ours}.parametrizations.weight.0._u", f"{theirs}.weight_u"
    yield f"{ours}.parametrizations.weight.0._v", f"{theirs}.weight_v"


def _block(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    for i in range(4):
        bn, their_bn = f"{ours}.bn{i + 1}.bn", f"{theirs}.bn_{i}"
        yield from _sn(f"{bn}.gain", f"{their_bn}.scale")
        yield from _sn(f"{bn}.bias", f"{their_bn}.offset")
        yield f"{bn}.bn.running_mean", f"{their_bn}.running_means"
        yield f"{bn}.bn.running_var", f"{their_bn}.running_vars"
        yield f"{ours}.conv{i + 1}.bias", f"{theirs}.conv_{i}.bias"
        yield from _sn(f"{ours}.conv{i + 1}", f"{theirs}.conv_{i}")


def _attention(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    yield f"{ours}.gamma", f"{theirs}.gamma"
    for mine, their in (("theta", "theta"), ("phi", "phi"), ("g", "g"), ("o", "o_conv")):
        yield from _sn(f"{ours}.{mine}", f"{theirs}.snconv1x1_{their}")


def _as_loaded(spec: LoadedSpec | Spec) -> LoadedSpec:
    return spec if isinstance(spec, LoadedSpec) else LoadedSpec(spec, SourceMap(), Path("<spec>"))


def _generator_map(
    loaded: LoadedSpec, plan: NetworkPlan, state: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, str]], str, str]:
    """(our key, their key) for every weight, walking the spec's generator in execution order;
    also the names of the fc and the reshape node after it. Checks what the weights cannot show."""
    network = loaded.spec.all_networks()["generator"]
    if network.bn_eps != TFHUB_EPS:
        raise user_error(
            f"generator.bn_eps is {network.bn_eps}; TF-Hub's BigGAN-deep normalises with {TFHUB_EPS}",
            path="generator.bn_eps",
            hint=f"set generator.bn_eps={TFHUB_EPS}, or {HINT}",
        )
    nodes = network.nodes
    embedding = [name for name, node in nodes.items() if node.kind == "embedding"]
    pairs: list[tuple[str, str]] = []
    ours_layers: list[tuple[str, str]] = []  # (kind, prefix) of our blocks and attention, in order
    fc = reshape = ""
    for name, _ in plan.steps:
        node = nodes[name]
        refs = node.refs().get("in", [])
        if node.kind == "embedding":
            pairs.append((f"{name}.weight", "embeddings.weight"))
        elif node.kind == "concat" and any(r in embedding for r in refs):
            if len(refs) != 2 or refs[1] not in embedding:
                raise user_error(
                    f"generator.nodes.{name}.in is {refs}; TF-Hub's conditioning vector is [z, class embedding]",
                    path=f"generator.nodes.{name}.in",
                    hint=f"in: [z, {embedding[0]}], as in biggan_deep_128_tfhub",
                )
        elif node.kind == "linear":
            fc = name
            pairs.append((f"{name}.bias", "generator.gen_z.bias"))
            pairs.extend(_sn(name, "generator.gen_z"))
        elif node.kind == "reshape":
            reshape = name
        elif node.kind == "biggan_deep_up":
            ours_layers += [("block", name if node.repeat == 1 else f"{name}.{i}") for i in range(node.repeat)]
        elif node.kind == "attention":
            ours_layers.append(("attention", name))
        elif node.kind == "g_output":
            pairs += [(f"{name}.bn.{p}", f"generator.bn.{p}") for p in ("weight", "bias")]
            pairs += [(f"{name}.bn.running_mean", "generator.bn.running_means")]
            pairs += [(f"{name}.bn.running_var", "generator.bn.running_vars")]
            pairs.append((f"{name}.conv.bias", "generator.conv_to_rgb.bias"))
            pairs.extend(_sn(f"{name}.conv", "generator.conv_to_rgb"))
    theirs_layers = _their_layers(state)
    if [k for k, _ in ours_layers] != [k for k, _ in theirs_layers]:

        def layout(layers: list[tuple[str, str]]) -> str:
            kinds = [k for k, _ in layers]
            where = f", attention after block {kinds.index('attention')}" if "attention" in kinds else ""
            return f"{kinds.count('block')} blocks{where}"

        raise user_error(
            f"the spec's generator has {layout(ours_layers)}; the weights have {layout(theirs_layers)}", hint=HINT
        )
    for (kind, ours), (_, theirs) in zip(ours_layers, theirs_layers, strict=True):
        pairs.extend((_block if kind == "block" else _attention)(ours, theirs))
    return pairs, fc, reshape


def _listed(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def convert(
    state: dict[str, torch.Tensor], spec: LoadedSpec | Spec, *, truncation: float = DEFAULT_TRUNCATION
) -> dict[str, dict[str, torch.Tensor]]:
    """{"G": the state dict of the spec's generator} from pytorch-pretrained-biggan's state dict.
    Every key of theirs is consumed and every key of ours filled, else a user error names them.
    BatchNorm's running statistics are TF-Hub's at `truncation` (in (0, 1], the package's
    `truncation` argument); BatchNorm's step counters, which theirs lack, start at 0."""
    loaded = _as_loaded(spec)
    if not 0 < truncation <= 1:
        raise user_error(f"truncation {truncation} is outside (0, 1], the range of TF-Hub's BatchNorm statistics")
    if "generator" not in loaded.spec.all_networks():
        raise user_error("the spec has no generator to load TF-Hub's BigGAN-deep weights into", hint=HINT)
    plan = analyze_network(loaded, "generator")
    pairs, fc, reshape = _generator_map(loaded, plan, state)
    expected = instantiate(loaded, plan, "meta").state_dict()
    counters = {k for k in expected if k.endswith(".num_batches_tracked")}
    used = {theirs for _, theirs in pairs}
    mapped = {ours for ours, _ in pairs}
    unexpected = sorted(k for k in state if k not in used)
    absent = sorted(theirs for _, theirs in pairs if theirs not in state)
    unfilled = sorted(k for k in expected if k not in mapped and k not in counters)
    extra = sorted(k for k in mapped if k not in expected)
    problems = [
        f"{label}: {_listed(names)}"
        for label, names in (
            ("keys of the weights the spec's generator has no place for", unexpected),
            ("keys the weights lack", absent),
            ("generator keys the weights do not fill", unfilled),
            ("generator keys the spec lacks", extra),
        )
        if names
    ]
    if problems:
        differ = "; ".join(problems)
        raise user_error(f"TF-Hub BigGAN-deep weights and the spec's generator differ: {differ}", hint=HINT)

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in pairs:
        value = state[theirs]
        if theirs.endswith(("running_means", "running_vars")):
            value = stats_at(value, truncation)
        elif theirs == "embeddings.weight":
            value = value.t()
        elif theirs.startswith("generator.gen_z.") and not theirs.endswith("weight_v"):
            value = _fc_rows(value, expected[ours].shape, fc, reshape, loaded)
        out[ours] = value.contiguous()
    for key in counters:
        out[key] = torch.zeros((), dtype=torch.long)
    wrong = [
        f"{k} {tuple(out[k].shape)} (the spec's {tuple(v.shape)})"
        for k, v in expected.items()
        if out[k].shape != v.shape
    ]
    if wrong:
        raise user_error(f"the weights' shapes differ from the spec's generator: {_listed(wrong)}", hint=HINT)
    return {"G": {k: out[k] for k in expected}}


def _fc_rows(value: torch.Tensor, shape: torch.Size, fc: str, reshape: str, loaded: LoadedSpec) -> torch.Tensor:
    """The fc's rows (weight, bias or u) reordered from TensorFlow's (h, w, c) to our (c, h, w)."""
    rows = value.shape[0]
    channels = rows // (BOTTOM * BOTTOM)
    target = [channels, BOTTOM, BOTTOM]
    node = loaded.spec.all_networks()["generator"].nodes.get(reshape)
    if not reshape or getattr(node, "shape", None) != target:
        raise user_error(
            f"the fc {fc!r} must be reshaped to {target} (TF-Hub's 4x4 start), found {getattr(node, 'shape', None)}",
            hint=HINT,
        )
    if value.shape != shape:  # reported with every other shape by convert
        return value
    return value.unflatten(0, (BOTTOM * BOTTOM, channels)).transpose(0, 1).flatten(0, 1)
