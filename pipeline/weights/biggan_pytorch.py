"""BigGAN-PyTorch's checkpoints (github.com/ajbrock/BigGAN-PyTorch, commit 9845943): `G.pth`,
`G_ema.pth` and `D.pth`, each a plain state dict of tensors written by `utils.save_weights`
(`torch.save(G.state_dict(), ...)`), converted into the state dicts of this project's networks
built from a spec (`biggan_*`, `biggan_deep_*` and specs derived from them).

The networks are the same functions (docs/fidelity.md); only the names and the spectral norm's
stored state differ. The mapping, written down once:

    theirs (BigGAN.py, BigGANdeep.py, layers.py)       ours (a spec's nodes, in order)
    G  shared.weight                                   the embedding node (`shared`)
       linear.*                                        the linear node (`fc`)
       blocks.I.J (GBlock; J-th of resolution I)       each biggan_up / biggan_deep_up instance
       blocks.I.J (Attention, after block I's blocks)  the attention node
       output_layer.0 (bn: gain, bias, stats)          g_output's bn (weight, bias, stats)
       output_layer.2                                  g_output's conv
    D  input_conv (BigGAN-deep)                        the conv node (`stem`)
       blocks.I.J (DBlock or Attention)                each biggan_down / biggan_deep_down, attention
       linear, embed                                   d_head's linear and embed
    within a block: convK, conv_sc, theta, phi, g, o by the same names; a norm bnK (ccbn: gain,
    bias and its statistics) is our bnK.bn (ConditionalBatchNorm, or ClassBatchNorm for their
    non-shared ccbn, whose gain and bias are embeddings) with the statistics in bnK.bn.bn.

BatchNorm statistics come in the three forms `layers.ccbn` / `layers.bn` store them:
`stored_mean`/`stored_var` (the released models), `bn.running_mean`/`bn.running_var`/
`bn.num_batches_tracked` (`--cross_replica`) or `bn.stored_mean`/`bn.stored_var`/
`bn.accumulation_counter` (`--mybn`; the counter only counts standing-statistics passes, which
are never saved). Our `num_batches_tracked` takes theirs where there is one, else 0 (it only
matters with momentum None, which standing statistics set and reset themselves).

Spectral norm (`layers.SN`): they store the weight and u0 (1 x out), plus sv0, the last sigma,
kept for logging only. Each forward, training or not, runs one power iteration from u0 (v1 =
normalize(u0 W), u1 = normalize(v1 Wᵀ)) and divides by sigma = u1 W v1ᵀ; only training stores
u1. Ours (`blocks/layers.py:SpectralNorm`) keeps u and v and, in eval mode, divides by u W v
without iterating. So ours gets u = u1 and v = v1, computed here from their weight and u0: the
eval forward (sampling, evaluation) is then theirs exactly, and a training forward is the one
their next training forward would be (ours iterates once from u1, as they would after storing it).

Every key of theirs must be consumed and every key of ours filled, with matching shapes; anything
else is a user error naming the keys. Nothing here runs their code or unpickles anything but
tensors (`safe_files.read_torch`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipeline.blocks.attention import SelfAttention
from pipeline.blocks.biggan import DBlock, DeepDBlock, DeepGBlock, DHead, GBlock, GOutput
from pipeline.blocks.layers import SpectralNorm
from pipeline.errors import user_error
from pipeline.weights import network_of

if TYPE_CHECKING:
    from pipeline.graph import GraphModule
    from pipeline.spec.load import LoadedSpec

FORMAT = "biggan-pytorch"
# role -> the file `utils.save_weights` writes (no suffix: the released models have none)
FILES = {"G": "G.pth", "G_ema": "G_ema.pth", "D": "D.pth"}
HOLDS = "G, its EMA G_ema and D (BigGAN and BigGAN-deep), as utils.save_weights writes them"
LACKS = (
    "the optimizers' states (G_optim.pth, D_optim.pth) and counters (state_dict.pth): a fine-tuning run starts "
    "those afresh"
)

State = dict[str, torch.Tensor]


def convert(states: dict[str, object], loaded: LoadedSpec, *, dtype: torch.dtype | None = None) -> dict[str, State]:
    """Each given file's state (by role: G, G_ema, D) as a complete state dict of the spec's network
    (in `dtype`; None: the network's own, float32)."""
    return {role: convert_network(state, loaded, role, dtype=dtype) for role, state in states.items()}


# ----- one network -----
class _Mapping:
    """Their state, what of it is consumed, and our state as it fills."""

    def __init__(self, theirs: State, target: State, file: str, sn_eps: float, dtype: torch.dtype | None):
        self.theirs, self.target, self.file, self.sn_eps, self.dtype = theirs, target, file, sn_eps, dtype
        self.consumed: set[str] = set()
        self.ours: State = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.theirs:
            raise user_error(
                f"has no key {key!r}, which the spec's network needs",
                file=self.file,
                hint="the checkpoint and the spec describe different networks; pick the spec of its model "
                "(channels, resolution, attention, hierarchical z) or override the spec to match",
            )
        self.consumed.add(key)
        return self.theirs[key]

    def put(self, key: str, value: torch.Tensor, source: str) -> None:
        want = self.target[key]
        if tuple(value.shape) != tuple(want.shape):
            raise user_error(
                f"{source} has shape {tuple(value.shape)}, but the spec's {key} has {tuple(want.shape)}",
                file=self.file,
                hint="the checkpoint and the spec describe different networks (channels, classes, z size); "
                "override the spec to match the checkpoint",
            )
        dtype = self.dtype if self.dtype is not None and want.is_floating_point() else want.dtype
        self.ours[key] = value.detach().to(dtype).clone()

    # --- layers
    def layer(self, ours: str, theirs: str, module: nn.Module) -> None:
        """A conv, linear or embedding, with or without spectral norm."""
        sn = parametrize.is_parametrized(module, "weight")
        if sn:
            chain = list(cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)["weight"]))
            if len(chain) != 1 or not isinstance(chain[0], SpectralNorm):
                raise user_error(
                    f"the spec's {ours} has a weight parametrization other than spectral norm alone "
                    f"({', '.join(type(p).__name__ for p in chain)}), which BigGAN-PyTorch has not",
                    file=self.file,
                )
        theirs_sn = f"{theirs}.u0" in self.theirs
        if sn != theirs_sn:
            raise user_error(
                f"{theirs} is {'' if theirs_sn else 'not '}spectrally normalised, the spec's {ours} is"
                f"{'' if sn else ' not'}",
                file=self.file,
                hint="set the network's (or node's) `sn` to match the checkpoint (BigGAN-PyTorch: G_param/D_param "
                "SN, G's shared embedding without)",
            )
        weight = self.take(f"{theirs}.weight")
        if sn:
            key = f"{ours}.parametrizations.weight.original"
            self.put(key, weight, f"{theirs}.weight")
            u, v = sn_vectors(weight, self.take(f"{theirs}.u0"), self.sn_eps, f"{theirs}.u0", self.file)
            self.take(f"{theirs}.sv0")  # the last sigma, for their logs only
            self.put(f"{ours}.parametrizations.weight.0._u", u, f"{theirs}.u0")
            self.put(f"{ours}.parametrizations.weight.0._v", v, f"{theirs}.u0")
        else:
            self.put(f"{ours}.weight", weight, f"{theirs}.weight")
        if getattr(module, "bias", None) is not None:
            self.put(f"{ours}.bias", self.take(f"{theirs}.bias"), f"{theirs}.bias")

    def batch_norm(self, ours: str, theirs: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        """Running statistics in any of their three forms; gain and bias where ours is affine."""
        t = self.theirs
        count: torch.Tensor | None = None
        if f"{theirs}.stored_mean" in t:
            mean, var = self.take(f"{theirs}.stored_mean"), self.take(f"{theirs}.stored_var")
        elif f"{theirs}.bn.running_mean" in t:  # --cross_replica: their SyncBN, affine=False
            mean, var = self.take(f"{theirs}.bn.running_mean"), self.take(f"{theirs}.bn.running_var")
            if f"{theirs}.bn.num_batches_tracked" in t:
                count = self.take(f"{theirs}.bn.num_batches_tracked")
        elif f"{theirs}.bn.stored_mean" in t:  # --mybn
            mean, var = self.take(f"{theirs}.bn.stored_mean"), self.take(f"{theirs}.bn.stored_var")
            self.take(f"{theirs}.bn.accumulation_counter")  # standing-stats passes, never saved mid-way
        else:
            raise user_error(
                f"has no BatchNorm statistics for {theirs} ({theirs}.stored_mean, {theirs}.bn.running_mean or "
                f"{theirs}.bn.stored_mean), which the spec's {ours} needs",
                file=self.file,
                hint="the checkpoint and the spec describe different networks",
            )
        self.put(f"{ours}.running_mean", mean, f"{theirs} mean")
        self.put(f"{ours}.running_var", var, f"{theirs} var")
        count = count if count is not None else torch.zeros((), dtype=torch.long)
        self.put(f"{ours}.num_batches_tracked", count, theirs)
        if module.affine:  # layers.bn: gain and bias as parameters of its own
            self.put(f"{ours}.weight", self.take(f"{theirs}.gain"), f"{theirs}.gain")
            self.put(f"{ours}.bias", self.take(f"{theirs}.bias"), f"{theirs}.bias")

    def unit(self, ours: str, theirs: str, module: nn.Module, names: dict[str, str] | None = None) -> None:
        """Every weighted layer, BatchNorm and attention gain inside one of our nodes; `names` maps
        our submodule names to theirs where they differ (else `_their_name`)."""
        join = lambda a, b: f"{a}.{b}" if a and b else a or b  # noqa: E731
        for rel, m in module.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                self.layer(join(ours, rel), join(theirs, _their_name(rel, names)), m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.batch_norm(join(ours, rel), join(theirs, _their_name(rel, names)), m)
            elif isinstance(m, SelfAttention):  # their gamma is 0-d, ours (1,)
                key = join(theirs, join(_their_name(rel, names), "gamma"))
                self.put(join(ours, join(rel, "gamma")), self.take(key).reshape(1), key)


def _their_name(rel: str, names: dict[str, str] | None) -> str:
    """Our submodule name as theirs: a norm slot bnK holds our norm module as bnK.bn, and a
    conditional norm its BatchNorm as bnK.bn.bn; theirs are bnK itself."""
    if names is not None:
        head, _, rest = rel.partition(".")
        return f"{names[head]}.{rest}" if rest else names.get(head, head)
    m = re.fullmatch(r"(bn\d+)\.bn(?:\.(.+))?", rel)
    if m is None:
        return rel
    slot, inner = m.group(1), m.group(2)
    return slot if inner in (None, "bn") else f"{slot}.{inner}"


def sn_vectors(
    weight: torch.Tensor, u0: torch.Tensor, eps: float, what: str = "u0", file: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our SpectralNorm's (u, v) for their weight and stored u0: one power iteration from u0, in
    float64, as `layers.power_iteration` runs in every forward (v = normalize(u0 W), u = normalize(v Wᵀ))."""
    mat = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    if u0.numel() != mat.shape[0]:
        raise user_error(
            f"{what} has {u0.numel()} values, but its weight has {mat.shape[0]} rows",
            file=file,
            hint="the file is damaged or not a BigGAN-PyTorch checkpoint",
        )
    u0 = u0.detach().to(torch.float64).reshape(-1)
    v = F.normalize(mat.t() @ u0, dim=0, eps=eps)
    u = F.normalize(mat @ v, dim=0, eps=eps)
    return u, v


def _units(module: GraphModule) -> list[tuple[str, nn.Module]]:
    """Our nodes that hold state, in the order the graph runs them, a repeated node's instances each."""
    out: list[tuple[str, nn.Module]] = []
    for name, _ in module.steps:
        node = module[name]
        if not any(True for _ in node.state_dict()):
            continue
        if isinstance(node, nn.ModuleList):
            out += [(f"{name}.{i}", m) for i, m in enumerate(node)]
        else:
            out.append((name, node))
    return out


def _kind(module: nn.Module) -> str:
    if isinstance(module, (GBlock, DeepGBlock)):
        return "G block"
    if isinstance(module, (DBlock, DeepDBlock)):
        return "D block"
    if isinstance(module, SelfAttention):
        return "attention"
    if isinstance(module, GOutput):
        return "output"
    if isinstance(module, DHead):
        return "head"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return type(module).__name__


def _their_units(state: State, generator: bool) -> list[tuple[str, str]]:
    """(prefix, kind) of their modules in the order their forward runs them."""
    blocks: dict[tuple[int, int], str] = {}
    for key in state:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if m:
            index = (int(m.group(1)), int(m.group(2)))
            attention = f"blocks.{index[0]}.{index[1]}.gamma" in state
            blocks[index] = "attention" if attention else ("G block" if generator else "D block")
    ordered = [(f"blocks.{i}.{j}", blocks[(i, j)]) for i, j in sorted(blocks)]
    if generator:
        head = [("shared", "embedding")] if "shared.weight" in state else []
        return [*head, ("linear", "linear"), *ordered, ("output_layer", "output")]
    stem = [("input_conv", "conv")] if "input_conv.weight" in state else []
    return [*stem, *ordered, ("", "head")]


def convert_network(state: object, loaded: LoadedSpec, role: str, *, dtype: torch.dtype | None = None) -> State:
    """One of their state dicts (G.pth, G_ema.pth or D.pth) as a complete state dict of the spec's
    network in that role. Built on the meta device: only names and shapes are needed."""
    from pipeline.graph import build_network

    file = FILES[role]
    theirs = check_state(state, file)
    network = network_of(loaded, role)
    model = build_network(loaded, network, "meta", compile=False)
    target = model.state_dict()
    sn_eps = loaded.spec.all_networks()[network].sn_eps
    mapping = _Mapping(theirs, target, file, sn_eps, dtype)
    ours_units = _units(model)
    theirs_units = _their_units(theirs, generator=role != "D")
    ours_kinds = [_kind(m) for _, m in ours_units]
    theirs_kinds = [kind for _, kind in theirs_units]
    if ours_kinds != theirs_kinds:
        raise user_error(
            f"holds a network of {len(theirs_kinds)} parts ({_summary(theirs_units)}), the spec's {network} "
            f"{len(ours_kinds)} ({_summary([(n, k) for (n, _), k in zip(ours_units, ours_kinds, strict=True)])})",
            file=file,
            hint="pick the spec of the checkpoint's model (biggan_* for BigGAN.py, biggan_deep_* for "
            "BigGANdeep.py) with its resolution and attention placement",
        )
    for (ours, module), (prefix, kind) in zip(ours_units, theirs_units, strict=True):
        if kind == "output":
            mapping.unit(ours, prefix, module, {"bn": "0", "conv": "2"})
        elif kind == "head":
            mapping.unit(ours, prefix, module, {"linear": "linear", "embed": "embed"})
        else:
            mapping.unit(ours, prefix, module)
    left = sorted(set(theirs) - mapping.consumed)
    if left:
        raise user_error(
            f"{len(left)} key(s) of the checkpoint have no place in the spec's {network}: {_names(left)}",
            file=file,
            hint="u1/sv1 and beyond: trained with num_G_SVs/num_D_SVs > 1, which this project's spectral norm "
            "does not keep"
            if any(re.search(r"\.(u|sv)[1-9]\d*$", k) for k in left)
            else "the checkpoint and the spec describe different networks",
        )
    missing = sorted(set(target) - set(mapping.ours))
    if missing:
        raise user_error(f"the spec's {network} has keys nothing filled: {_names(missing)}", file=file)
    model.load_state_dict(mapping.ours, strict=True, assign=True)  # the last check: names, shapes
    return mapping.ours


def check_state(state: object, file: str) -> State:
    """A state dict of named tensors, or a user error saying what the file holds instead. A
    DataParallel prefix (`module.`) is dropped."""
    if not isinstance(state, dict):
        raise user_error(
            f"holds a {type(state).__name__}, not a state dict",
            file=file,
            hint="expected the file utils.save_weights writes: torch.save(G.state_dict(), ...)",
        )
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise user_error(
            f"is not a state dict of tensors: {_names(bad)} hold something else",
            file=file,
            hint="G_optim.pth, D_optim.pth and state_dict.pth hold optimizer states and counters, not weights",
        )
    if not state:
        raise user_error("is an empty state dict", file=file)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _summary(units: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for _, kind in units:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ": " + " ".join(kind for _, kind in units)
