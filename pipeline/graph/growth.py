"""Progressive growing (ProGAN, `grow:`): the stages of a growing network, the checker's
analysis of them (a mixin of the checker), and the stage switching and fade-in blending of its
forward (a mixin of GraphModule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.blocks.layers import SpectralNorm, avgpool2, upsample2
from pipeline.blocks.registry import BlockError
from pipeline.errors import did_you_mean
from pipeline.graph.plan import PROBE_BATCH, NetworkPlan, Row, _shape_str, combined, context, gather, lookup

if TYPE_CHECKING:
    from pipeline.blocks.registry import Node, Shape
    from pipeline.spec.load import LoadedSpec
    from pipeline.spec.schema import NetworkSpec


@dataclass(frozen=True)
class Stage:
    """One stage of a growing network: its image side, and parameters and forward FLOPs per image
    of the network at that stage, stable and during its fade-in (both paths run then)."""

    index: int
    resolution: int
    params: int
    flops: float
    fade_params: int
    fade_flops: float


@dataclass
class Growth:
    """How a network grows (`grow:`): the repeated node whose instances are the stages, the side
    the image is on (`output`: a generator, `input`: a discriminator), and the nodes built once
    per stage, between that node and the image."""

    chain: str
    side: str
    per_stage: tuple[str, ...]
    image: str | None  # the image input (input side)
    output: str | None  # the image output (output side)
    stages: list[Stage] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.stages)


class GrowingModule:
    """GraphModule's running of a growing network: choosing its stage and the forward that runs
    that stage (GraphModule's `__init__` sets `growth`, `stage`, `fading` and the buffer `alpha`)."""

    # GraphModule's, declared for the type checker
    growth: Growth | None
    stage: int
    fading: bool
    alpha: torch.Tensor
    steps: list[tuple[str, list[tuple[str, list[str]]]]]
    output_refs: tuple[str, ...]

    if TYPE_CHECKING:  # nn.ModuleDict's and GraphModule's methods (defined here, they would shadow them)

        def __getitem__(self, key: str) -> Any: ...  # a node's module: a block, a Chain, a ModuleList per stage

        def _layout(self, value: Any) -> Any: ...

    def set_stage(self, stage: int, fading: bool = False, alpha: float = 1.0) -> None:
        """Run at `stage` (0: the smallest); during a fade-in, blend in the new stage by `alpha`."""
        g = self.growth
        if g is None or not 0 <= stage < g.num_stages or (fading and stage == 0):
            raise ValueError(f"stage {stage} (fading {fading}) is not a stage of this network")
        self.stage, self.fading = stage, fading
        self.alpha.fill_(alpha)

    def _grown(self, values: dict):
        g, k, fading = self.growth, self.stage, self.fading
        assert g is not None  # forward runs _grown only for a growing network
        blocks = self[g.chain]
        old = dict(values)  # the previous stage's path, during a fade-in
        if fading and g.side == "input":
            old[g.image] = avgpool2(values[g.image])
        for name, fields in self.steps:
            args = [gather(values, mode, refs) for mode, refs in fields]
            if name in g.per_stage:
                values[name] = self._layout(self[name][k](*args))
                if fading:
                    old[name] = self._layout(self[name][k - 1](*(gather(old, mode, refs) for mode, refs in fields)))
            elif name == g.chain and g.side == "output":  # the first k instances
                x, *shared = args
                before = x
                for block in blocks[:k]:
                    before, x = x, block(x, *shared)
                values[name], old[name] = x, before
            elif name == g.chain:  # the last k instances, the first of them faded in
                x, *shared = args
                start = len(blocks) - k
                if fading:
                    x = _blend(gather(old, *fields[0]), blocks[start](x, *shared), self.alpha)
                    start += 1
                for block in blocks[start:]:
                    x = block(x, *shared)
                values[name] = x
            else:
                values[name] = old[name] = self._layout(self[name](*args))
        if g.side == "output" and fading:
            return _blend(upsample2(old[g.output]), values[g.output], self.alpha)
        return (
            lookup(values, self.output_refs[0])
            if len(self.output_refs) == 1
            else tuple(lookup(values, ref) for ref in self.output_refs)
        )


def _blend(old: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) old + alpha new: the fade-in of a new stage."""
    return torch.lerp(old.to(new.dtype), new, alpha.to(new.dtype))


class GrowthAnalysis:
    """The checker's analysis of a growing network (uses the checker's `net`, `loaded`, `which`
    and `issue`)."""

    # the checker's, declared for the type checker
    loaded: LoadedSpec
    which: str
    net: NetworkSpec

    if TYPE_CHECKING:  # the checker's method (defined here, it would shadow it)

        def issue(self, message: str, *loc: str | int, hint: str | None = None) -> None: ...

    # ----- progressive growing
    def analyze_growth(self, plan: NetworkPlan, values: dict) -> None:
        """The stages of a growing network: which nodes are built per stage, each stage's instances
        of them (checked on that stage's shapes), and parameters and FLOPs per stage."""
        growth = self._growth_structure(plan)
        if growth is None:
            return
        n, ctx = self.net.nodes[growth.chain].repeat, context(self.loaded.spec, self.which, meta=True)
        stage_rows: list[list[Row]] = []
        built: dict[str, list[tuple[Node, dict]]] = {name: [] for name in growth.per_stage}
        sides: list[int] = []
        with torch.device("meta"):
            for k in range(n + 1):
                found = self._stage_nodes(growth, plan, values, k, ctx)
                if found is None:
                    return
                rows, instances, side = found
                if growth.side == "output" and k and side != 2 * sides[-1]:
                    self.issue(
                        f"stage {k} outputs {side}x{side} images, not twice stage {k - 1}'s {sides[-1]}x{sides[-1]}: "
                        "a fade-in upsamples the previous stage's image 2x",
                        "grow",
                    )
                    return
                stage_rows.append(rows)
                sides.append(side)
                for name, instance in instances.items():
                    built[name].append(instance)
        chain_rows = [r for r in plan.rows if r.name.partition("[")[0] == growth.chain]
        fixed = [r for r in plan.rows if r.name.partition("[")[0] not in (growth.chain, *growth.per_stage)]
        for k, rows in enumerate(stage_rows):
            active = chain_rows[:k] if growth.side == "output" else chain_rows[n - k :]
            stable = fixed + active + rows
            fading = stable + (stage_rows[k - 1] if k else [])
            growth.stages.append(
                Stage(
                    k,
                    sides[k],
                    sum(r.params for r in stable),
                    sum(r.flops for r in stable),
                    sum(r.params for r in fading),
                    sum(r.flops for r in fading),
                )
            )
        # a per-stage node's one row becomes a row per stage
        plan.rows = [
            stage_row
            for r in plan.rows
            for stage_row in (
                [rows[growth.per_stage.index(r.name)] for rows in stage_rows] if r.name in growth.per_stage else [r]
            )
        ]
        plan.instances |= built
        plan.growth = growth

    def _growth_structure(self, plan: NetworkPlan) -> Growth | None:
        """Which side the image is on and which nodes are built per stage, or None (reported)."""
        net, chain = self.net, self.net.grow
        assert chain is not None  # analyzed only for a network with `grow:`
        if chain not in net.nodes:
            self.issue(f"grow names {chain!r}, which is not a node", "grow", hint=did_you_mean(chain, net.nodes))
            return None
        node = net.nodes[chain]
        refs = node.ref_fields()
        if not refs or refs[0][1] != "in" or refs[0][2] != "one":
            self.issue(f"node {chain!r} ({node.kind}) has no single `in` to chain the stages on", "grow")
            return None
        deps = {name: {r.partition(".")[0] for rs in nd.refs().values() for r in rs} for name, nd in net.nodes.items()}

        def upstream(name: str) -> set[str]:
            found, todo = set(), [name]
            while todo:
                for dep in deps.get(todo.pop(), ()):
                    if dep in net.nodes and dep not in found:
                        found.add(dep)
                        todo.append(dep)
            return found

        order = [name for name, _ in plan.steps]
        images = [name for name, shape in plan.inputs.items() if len(shape) == 3]
        if images:  # a discriminator: the stages enter at the image, before the chain
            per_stage = tuple(x for x in order if x in upstream(chain))
            feeder = node.refs()["in"][0].partition(".")[0]
            if feeder not in per_stage:
                self.issue(
                    f"the stages of {chain!r} take the image through nodes built per stage (e.g. from_rgb), but "
                    f"its `in` is {feeder!r}",
                    "grow",
                    hint="give the chain's first instance a from_rgb node as its `in`",
                )
                return None
            if plan.inputs[images[0]][1] % (1 << node.repeat):
                self.issue(f"the image side {plan.inputs[images[0]][1]} does not halve {node.repeat} times", "grow")
                return None
            return Growth(chain, "input", per_stage, images[0], None)
        per_stage = tuple(x for x in order if chain in upstream(x))  # a generator: after the chain
        if len(net.output) != 1 or net.output[0] not in per_stage:
            self.issue(
                f"a growing generator has one output, after {chain!r} (e.g. its to_rgb)",
                "output",
                hint="give one output that takes the chain's output through per-stage nodes",
            )
            return None
        return Growth(chain, "output", per_stage, None, net.output[0])

    def _stage_nodes(self, growth: Growth, plan: NetworkPlan, values: dict, k: int, ctx):
        """Stage k's instances of the per-stage nodes, built and run on meta: (their report rows,
        {node: (instance, input shapes)}, the stage's image side), or None (reported)."""
        net, chain = self.net, growth.chain
        n, shapes = net.nodes[chain].repeat, plan.chain_shapes[chain]  # [input, after instance 0, ...]
        local = dict(values)
        feeder: str | None = None
        cut: Shape | None = None
        if growth.side == "output":  # the chain's output after k instances
            local[chain] = torch.zeros((PROBE_BATCH, *shapes[k]))
        else:  # the image at the stage's side, entering where instance n - k takes its input
            assert growth.image is not None  # an input-side growth has its image input
            c, h, w = plan.inputs[growth.image]
            local[growth.image] = torch.zeros((PROBE_BATCH, c, h >> (n - k), w >> (n - k)))
            feeder, cut = net.nodes[chain].refs()["in"][0].partition(".")[0], shapes[n - k]
        rows, instances = [], {}
        for name in growth.per_stage:
            node = net.nodes[name]
            if name == feeder and "out_channels" in type(node).model_fields:
                assert cut is not None  # set with the feeder
                node = node.model_copy(update={"out_channels": cut[0]})
            fields = [(key, mode, node.refs()[key]) for _, key, mode in node.ref_fields()]
            in_shapes = {}
            try:
                in_shapes = {key: self._shape_of(local, refs, mode, key) for key, mode, refs in fields}
                module = node.build(in_shapes, ctx.for_node(node))
                module.eval()
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    out = module(*(gather(local, mode, refs) for _, mode, refs in fields))
                module.train()
            except BlockError as exc:
                self.issue(f"stage {k}: {exc.message}", "nodes", name, hint=exc.hint)
                return None
            except Exception as exc:  # a shape the block's own checks did not anticipate
                self.issue(f"stage {k}: fails on input shapes {in_shapes}: {exc}", "nodes", name)
                return None
            local[name] = out
            side = out.shape[-1] if growth.side == "output" else local[growth.image].shape[-1]
            params = sum(p.numel() for p in module.parameters())
            sn_flops = sum(m.flops_per_forward for m in module.modules() if isinstance(m, SpectralNorm))
            shape = tuple(out.shape[1:])
            rows.append(
                Row(
                    f"{name}@{side}",
                    node.kind,
                    _shape_str(shape),
                    params,
                    counter.get_total_flops() / PROBE_BATCH,
                    sn_flops,
                )
            )
            instances[name] = (node, in_shapes)
        if feeder is not None and tuple(local[feeder].shape[1:]) != cut:
            self.issue(
                f"stage {k}: {feeder} outputs {_shape_str(tuple(local[feeder].shape[1:]))}, but the stage enters "
                f"the network where it holds {_shape_str(cut)}",
                "nodes",
                feeder,
            )
            return None
        side = local[growth.output].shape[-1] if growth.side == "output" else local[growth.image].shape[-1]
        return rows, instances, int(side)

    def _shape_of(self, local: dict, refs: list[str], mode: str, key: str):
        return combined([tuple(lookup(local, r).shape[1:]) for r in refs], mode, key)
