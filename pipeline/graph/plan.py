"""The network plan that analysis produces and instantiation reads (report rows, nodes, shapes,
instances), the helpers that route values and shapes along its references, and a network's
inputs and build context as its spec gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.blocks.layers import BuildContext
from pipeline.blocks.registry import BlockError, Node, Shape
from pipeline.errors import Issue, SpecError, did_you_mean

if TYPE_CHECKING:
    from pipeline.graph.growth import Growth
    from pipeline.spec.load import LoadedSpec

PROBE_BATCH = 2  # BatchNorm in train mode needs more than one value per channel


@dataclass
class Row:
    name: str
    kind: str
    shape: str
    params: int
    flops: float  # forward, per image
    sn_flops: int  # spectral norm's power iteration, per training forward (not per image)


@dataclass
class NetworkPlan:
    """Everything known about a network after analysis; enough to instantiate it anywhere."""

    which: str
    inputs: dict[str, Shape]
    outputs: list[str]
    steps: list[tuple[str, list[tuple[str, list[str]]]]]  # (node, [(mode, refs)] per reference field)
    instances: dict[str, list[tuple[Node, dict]]]  # node -> [(instance params, input shapes)]
    shapes: dict[str, object]  # node or input -> output shape (a list of shapes for several outputs)
    rows: list[Row] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the meta modules
    growth: Growth | None = None
    chain_shapes: dict[str, list] = field(default_factory=dict)  # repeated node -> [input, after each instance]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def flops_per_image(self) -> float:
        """Forward FLOPs per image (a growing network's at its last stage, stable)."""
        if self.growth is not None:
            return self.growth.stages[-1].flops
        return sum(r.flops for r in self.rows)

    @property
    def sn_flops_per_forward(self) -> int:
        return sum(r.sn_flops for r in self.rows)

    @property
    def output_shapes(self) -> list[Shape]:
        return [lookup(self.shapes, ref) for ref in self.outputs]


def lookup(values: dict, ref: str):
    name, _, index = ref.partition(".")
    value = values[name]
    return value[int(index)] if index else value


def gather(values: dict, mode: str, refs: list[str]):
    if not refs:
        return None
    items = [lookup(values, r) for r in refs]
    if mode == "one":
        return items[0]
    if mode == "many":
        return items
    return items[0] if len(items) == 1 else torch.cat(items, 1)  # joined


def graph_inputs(loaded: LoadedSpec, which: str) -> dict[str, Shape]:
    """A network's inputs in call order with their per-sample shapes: those it declares, else
    those its method gives a network of its role (the shorthands: z, y and image, y)."""
    from pipeline.spec.schema import InputSpec

    spec = loaded.spec
    net = spec.all_networks()[which]
    declared = dict(net.inputs)
    need = spec.method.networks(spec).get(which)
    if not declared and need is not None:
        declared = {name: InputSpec.model_validate(_input_data(text)) for name, text in need.inputs.items()}
    if not declared:
        path = f"{spec.network_path(which)}.inputs"
        raise SpecError(
            [
                Issue(
                    "the network declares no inputs",
                    path,
                    *loaded.where(tuple(path.split("."))),
                    "e.g. inputs: {image: image} or inputs: {z: latent, y: labels}",
                )
            ]
        )
    d = spec.data
    shapes: dict[str, Shape] = {}
    issues: list[Issue] = []
    for name, inp in declared.items():
        path = f"{spec.network_path(which)}.inputs.{name}"
        if inp.kind == "latent":
            size = inp.size or (spec.latent.z_dim if spec.latent else None)
            if size is None:
                issues.append(
                    Issue("a latent input needs latent.z_dim (or its own size)", path, *loaded.where(("latent",)))
                )
                continue
            shapes[name] = (size,)
        elif inp.kind == "labels":
            if d.num_classes is None:
                issues.append(Issue("a labels input needs data.num_classes", path, *loaded.where(("data",))))
                continue
            shapes[name] = ()
        else:
            if inp.stream is not None and inp.stream not in d.all_streams():
                issues.append(
                    Issue(
                        f"unknown data stream {inp.stream!r}",
                        path,
                        *loaded.where(tuple(path.split("."))),
                        did_you_mean(inp.stream, d.all_streams()),
                    )
                )
                continue
            side = inp.resolution or d.resolution
            shapes[name] = (inp.channels or d.channels, side, side)
    if issues:
        raise SpecError(issues)
    return shapes


def _input_data(text: str) -> dict:
    kind, _, stream = text.partition(":")
    return {"kind": kind, **({"stream": stream} if stream else {})}


def context(spec, which: str, meta: bool) -> BuildContext:
    net = spec.all_networks()[which]
    return BuildContext(
        num_classes=spec.data.num_classes,
        image_channels=spec.data.channels,
        init=net.init,
        sn=net.sn,
        sn_eps=net.sn_eps,
        bn_eps=net.bn_eps,
        bn_momentum=net.bn_momentum,
        cross_replica_bn=net.cross_replica_bn,
        meta=meta,
    )


def _shape_str(shape) -> str:
    if isinstance(shape, list):
        return " + ".join(_shape_str(s) for s in shape)
    return "x".join(map(str, shape)) if shape else "label"


def combined(shapes: list, mode: str, key: str):
    """The input shape a node's reference field passes on: one, a list, or joined features."""
    if not shapes:
        return None
    if mode == "one":
        return shapes[0]
    if mode == "many":
        return shapes
    if shapes == [()]:
        return ()  # the labels alone, passed on as they are (class_bn looks its tables up by class)
    if any(len(s) != 1 for s in shapes):
        raise BlockError(f"conditioning inputs must be feature vectors, got {', '.join(map(_shape_str, shapes))}", key)
    return (sum(s[0] for s in shapes),)
