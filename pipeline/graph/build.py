"""The graph compiler: a network spec -> checked DAG -> shapes, params and FLOPs on `meta`
-> an `nn.ModuleDict` keyed by the node names of the YAML, with a forward that runs the DAG.

Analysis builds every node on the meta device (no weight storage), runs it on meta tensors to
infer the next node's input shape, and counts FLOPs with `torch.utils.flop_counter`
(convolutions and matrix products, 2 per multiply-add), so reports compare with public figures.
"""

from __future__ import annotations

import math
import sys
import types
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.blocks.layers import BuildContext, SpectralNorm, avgpool2, upsample2
from pipeline.blocks.registry import BlockError, Node, Shape
from pipeline.errors import Issue, SpecError, did_you_mean

PROBE_BATCH = 2  # BatchNorm in train mode needs more than one value per channel
# Bounds on absurd sizes, checked during analysis (on meta, so nothing is allocated): far above any
# published GAN (BigGAN-deep 512 has ~56M parameters per network, ~34M values in its largest
# activation per image), far below what would overflow torch's size arithmetic.
MAX_PARAMS = 100_000_000_000
MAX_ACTIVATION = 1 << 31  # values in one node's output, per image
# Graphs of GraphModule.forward (shared by G and D) per stage and phase of a growing network: a
# step calls G without and with gradients, D on real, fake and interpolated images (measured: 5)
RECOMPILES_PER_PHASE = 8
SIZE_HINT = "a size this large is a typo (an extra zero?) or a unit mistake; check channel and feature counts"


@dataclass
class Row:
    name: str
    kind: str
    shape: str
    params: int
    flops: float  # forward, per image
    sn_flops: int  # spectral norm's power iteration, per training forward (not per image)


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


class Chain(nn.ModuleList):
    """A repeated node: each instance takes the previous output; other inputs are shared."""

    def forward(self, x, *shared):
        for block in self:
            x = block(x, *shared)
        return x


class GraphModule(nn.ModuleDict):
    """The compiled network: a ModuleDict keyed by node name, run in topological order.

    A growing network (`grow:`) runs at its current stage (`set_stage`; the last one when built):
    the chain's instances of the stages so far, the per-stage nodes of that stage, and during a
    fade-in also the previous stage's path, blended with the new one by the buffer `alpha` (a
    tensor, so that a compiled graph does not recompile as alpha rises)."""

    def __init__(self, modules: dict[str, nn.Module], plan: NetworkPlan):
        super().__init__(modules)
        self.input_names = tuple(plan.inputs)
        self.steps = plan.steps
        self.output_refs = tuple(plan.outputs)
        self.growth = plan.growth
        if self.growth is not None:
            self.stage, self.fading = self.growth.num_stages - 1, False
            self.register_buffer("alpha", torch.ones(()), persistent=False)
        self.channels_last = False  # see to_memory_format

    def set_stage(self, stage: int, fading: bool = False, alpha: float = 1.0) -> None:
        """Run at `stage` (0: the smallest); during a fade-in, blend in the new stage by `alpha`."""
        g = self.growth
        if g is None or not 0 <= stage < g.num_stages or (fading and stage == 0):
            raise ValueError(f"stage {stage} (fading {fading}) is not a stage of this network")
        self.stage, self.fading = stage, fading
        self.alpha.fill_(alpha)

    def _layout(self, value):
        """A feature map in channels-last format when the network runs so (a no-op for one that is)."""
        if self.channels_last and isinstance(value, torch.Tensor) and value.dim() == 4:
            return value.contiguous(memory_format=torch.channels_last)
        return value

    def forward(self, *args):
        values = {name: self._layout(arg) for name, arg in zip(self.input_names, args, strict=True)}
        if self.growth is not None:
            return self._grown(values)
        for name, fields in self.steps:
            values[name] = self._layout(self[name](*(gather(values, mode, refs) for mode, refs in fields)))
        outs = tuple(lookup(values, ref) for ref in self.output_refs)
        return outs[0] if len(outs) == 1 else outs

    def _grown(self, values: dict):
        g, k, fading = self.growth, self.stage, self.fading
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


def graph_inputs(loaded, which: str) -> dict[str, Shape]:
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
    d, shapes, issues = spec.data, {}, []
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


class _Checker:
    def __init__(self, loaded, which: str):
        self.loaded, self.which = loaded, which
        self.net = loaded.spec.all_networks()[which]
        self.loc = tuple(loaded.spec.network_path(which).split("."))
        self.issues: list[Issue] = []

    def issue(self, message: str, *loc, hint: str | None = None) -> None:
        full = self.loc + tuple(loc)
        file, line = self.loaded.where(full)
        self.issues.append(Issue(message, ".".join(map(str, full)), file, line, hint))

    # ----- structure -----
    def order(self, inputs: dict[str, Shape]) -> list[str]:
        """Names of the nodes the outputs depend on, in topological order; reports structural errors."""
        nodes = self.net.nodes
        reserved = set(dir(GraphModule))
        for name in nodes:
            if name in inputs:
                self.issue(
                    f"node name {name!r} is a graph input name",
                    "nodes",
                    name,
                    hint=f"{', '.join(inputs)} are the inputs of {self.which}; rename the node",
                )
            elif name in reserved:
                self.issue(f"node name {name!r} is reserved by torch.nn.Module", "nodes", name, hint="rename the node")
        known = list(nodes) + list(inputs)
        for name, node in nodes.items():
            for key, refs in node.refs().items():
                for i, ref in enumerate(refs):
                    base = ref.partition(".")[0]
                    loc = ("nodes", name, key) + ((i,) if len(refs) > 1 else ())
                    if base == name:
                        self.issue(f"node {name!r} takes its own output as input", *loc)
                    elif base not in nodes and base not in inputs:
                        self.issue(
                            f"unknown input {ref!r}",
                            *loc,
                            hint=did_you_mean(base, known) or f"inputs are {', '.join(inputs)} or a node name",
                        )
        for i, ref in enumerate(self.net.output):
            base = ref.partition(".")[0]
            if base not in nodes:
                self.issue(
                    f"unknown output node {ref!r}",
                    "output",
                    *((i,) if len(self.net.output) > 1 else ()),
                    hint=did_you_mean(base, nodes),
                )
        if self.issues:
            return []  # unused nodes and cycles would only echo a mistyped name
        order: list[str] = []
        state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

        def visit(name: str, stack: list[str]) -> None:
            if name in inputs or state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = stack[stack.index(name) :] + [name]
                self.issue(
                    "cycle: " + " -> ".join(cycle),
                    "nodes",
                    name,
                    hint="a network is a DAG; one of these inputs must come from an earlier node",
                )
                return
            state[name] = 1
            for refs in nodes[name].refs().values():
                for ref in refs:
                    visit(ref.partition(".")[0], stack + [name])
            state[name] = 2
            order.append(name)

        for ref in self.net.output:
            visit(ref.partition(".")[0], [])
        for name in nodes:
            if name not in state:
                self.issue(
                    f"node {name!r} is not used by any output",
                    "nodes",
                    name,
                    hint="connect it to the graph or remove it",
                )
        if self.issues:
            return []
        # The same set, re-ordered to follow the YAML wherever dependencies allow (reports read better).
        done: list[str] = []
        while len(done) < len(order):
            for name in nodes:
                deps = {r.partition(".")[0] for refs in nodes[name].refs().values() for r in refs} - set(inputs)
                if name not in done and deps <= set(done):
                    done.append(name)
                    break
        return done

    # ----- shapes, parameters, FLOPs -----
    def analyze(self, inputs: dict[str, Shape]) -> NetworkPlan | None:
        order = self.order(inputs)
        if self.issues:
            return None
        ctx = context(self.loaded.spec, self.which, meta=True)
        plan = NetworkPlan(self.which, inputs, list(self.net.output), [], {}, dict(inputs))
        values: dict[str, object] = {}
        with torch.device("meta"):
            for name, shape in inputs.items():
                values[name] = torch.zeros((PROBE_BATCH,) + shape, dtype=torch.long if shape == () else torch.float)
            broken: set[str] = set()
            for name in order:
                node = self.net.nodes[name]
                if any(r.partition(".")[0] in broken for refs in node.refs().values() for r in refs):
                    broken.add(name)  # already reported upstream
                    continue
                if not self.run_node(name, node, ctx, plan, values):
                    broken.add(name)
            if self.net.grow is not None and not self.issues:
                self.analyze_growth(plan, values)
        return None if self.issues else plan

    def input_shape(self, plan, name: str, key: str, mode: str, refs: list[str]):
        shapes = []
        for ref in refs:
            base, _, index = ref.partition(".")
            shape = plan.shapes[base]
            several = isinstance(shape, list)
            if several and not index:
                raise BlockError(
                    f"{base!r} has {len(shape)} outputs; refer to one as {base}.0 .. {base}.{len(shape) - 1}", key
                )
            if index and (not several or int(index) >= len(shape)):
                raise BlockError(
                    f"{ref!r}: {base!r} has {'only ' + str(len(shape)) if several else 'a single'} output"
                    f"{'s' if several else ''}",
                    key,
                )
            shapes.append(shape[int(index)] if index else shape)
        return combined(shapes, mode, key)

    def run_node(self, name: str, node: Node, ctx, plan: NetworkPlan, values: dict) -> bool:
        fields = [(mode, node.refs()[key]) for _, key, mode in node.ref_fields()]
        try:
            in_shapes = {
                key: self.input_shape(plan, name, key, mode, node.refs()[key]) for _, key, mode in node.ref_fields()
            }
        except BlockError as exc:
            self.issue(exc.message, "nodes", name, *([exc.field] if exc.field else []), hint=exc.hint)
            return False
        args = [gather(values, mode, refs) for mode, refs in fields]
        instances, modules = [], []
        plan.chain_shapes[name] = [in_shapes.get("in")]
        for i in range(node.repeat):
            inst = node.instance(i)
            label = f"{name}[{i}]" if node.repeat > 1 else name
            loc = ("nodes", name)
            where = f"instance {i}: " if node.repeat > 1 else ""
            try:
                module = inst.build(dict(in_shapes), ctx.for_node(inst))
            except BlockError as exc:
                self.issue(where + exc.message, *loc, *([exc.field] if exc.field else []), hint=exc.hint)
                return False
            except (RuntimeError, OverflowError, ValueError) as exc:  # torch refusing a size, e.g. 1e12 channels
                self.issue(f"{where}cannot be built: {str(exc).splitlines()[0]}", *loc, hint=SIZE_HINT)
                return False
            params = sum(p.numel() for p in module.parameters())
            plan_params = plan.params + params
            if plan_params > MAX_PARAMS:
                self.issue(
                    f"{where}the network reaches {plan_params:,} parameters here, above the bound of {MAX_PARAMS:,}",
                    *loc,
                    hint=SIZE_HINT,
                )
                return False
            try:
                # Eval mode skips BN statistics and SN power iterations, which flop_counter does not
                # count anyway (only convolutions and matrix products): FLOPs equal train mode's.
                module.eval()
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    out = module(*args)
                module.train()
            except Exception as exc:  # a shape the block's own checks did not anticipate
                self.issue(f"fails on input shapes {in_shapes}: {exc}", *loc)
                return False
            shape = [tuple(o.shape[1:]) for o in out] if isinstance(out, (tuple, list)) else tuple(out.shape[1:])
            largest = max((math.prod(s) for s in (shape if isinstance(shape, list) else [shape])), default=0)
            if largest > MAX_ACTIVATION:
                self.issue(
                    f"{where}outputs {_shape_str(shape)} = {largest:,} values per image, above the bound of "
                    f"{MAX_ACTIVATION:,}",
                    *loc,
                    hint=SIZE_HINT,
                )
                return False
            sn_flops = sum(m.flops_per_forward for m in module.modules() if isinstance(m, SpectralNorm))
            plan.rows.append(
                Row(
                    label,
                    inst.kind,
                    _shape_str(shape),
                    params,
                    counter.get_total_flops() / PROBE_BATCH,
                    sn_flops,
                )
            )
            instances.append((inst, dict(in_shapes)))
            modules.append(module)
            plan.chain_shapes[name].append(shape)
            if node.repeat > 1:
                args[0], in_shapes["in"] = out, shape
        values[name] = out
        plan.shapes[name] = shape
        plan.steps.append((name, fields))
        plan.instances[name] = instances
        plan.modules[name] = Chain(modules) if node.repeat > 1 or name == self.net.grow else modules[0]
        return True

    # ----- progressive growing
    def analyze_growth(self, plan: NetworkPlan, values: dict) -> None:
        """The stages of a growing network: which nodes are built per stage, each stage's instances
        of them (checked on that stage's shapes), and parameters and FLOPs per stage."""
        growth = self._growth_structure(plan)
        if growth is None:
            return
        n, ctx = self.net.nodes[growth.chain].repeat, context(self.loaded.spec, self.which, meta=True)
        stage_rows, built, sides = [], {name: [] for name in growth.per_stage}, []
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
        local, feeder, cut = dict(values), None, None
        if growth.side == "output":  # the chain's output after k instances
            local[chain] = torch.zeros((PROBE_BATCH, *shapes[k]))
        else:  # the image at the stage's side, entering where instance n - k takes its input
            c, h, w = plan.inputs[growth.image]
            local[growth.image] = torch.zeros((PROBE_BATCH, c, h >> (n - k), w >> (n - k)))
            feeder, cut = net.nodes[chain].refs()["in"][0].partition(".")[0], shapes[n - k]
        rows, instances = [], {}
        for name in growth.per_stage:
            node = net.nodes[name]
            if name == feeder and "out_channels" in type(node).model_fields:
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


class _NoDynamoImport(types.ModuleType):
    """Stands in for torch._dynamo while a network is analyzed on the meta device.

    torch wraps its Python meta kernels (elementwise references, `cat`, flop_counter's dispatch)
    in `torch._compile._disable_dynamo`, which imports torch._dynamo (over 1 s, most of a
    `validate`) on the first call only to mark the kernel as not to be traced, and caches the
    mark on the kernel. Analysis never compiles, so the stand-in marks nothing (the kernel runs
    as it is); on leaving, the stand-in and every cached mark are removed, and the next caller
    imports the real module. Anything else asked of it loads the real module and answers from it."""

    def __init__(self):
        super().__init__("torch._dynamo")
        self.marked: list = []

    def disable(self, fn, recursive=True, wrapping=True):
        self.marked.append(fn)
        return fn

    def __getattr__(self, name: str):
        self._leave()
        import torch._dynamo

        return getattr(torch._dynamo, name)

    def __enter__(self):
        if "torch._dynamo" in sys.modules:
            return self  # already paid for: nothing to save
        sys.modules["torch._dynamo"] = self
        return self

    def __exit__(self, *exc):
        self._leave()

    def _leave(self):
        if sys.modules.get("torch._dynamo") is self:
            del sys.modules["torch._dynamo"]
        if torch.__dict__.get("_dynamo") is self:
            del torch._dynamo
        for fn in self.__dict__.get("marked", ()):
            fn.__dict__.pop("__dynamo_disable", None)
        self.marked = []


def analyze_network(loaded, which: str) -> NetworkPlan:
    checker = _Checker(loaded, which)
    inputs = graph_inputs(loaded, which)
    with _NoDynamoImport():
        plan = checker.analyze(inputs)
    if checker.issues:
        raise SpecError(checker.issues)
    return plan


def _method_references(loaded) -> list[Issue]:
    """The networks and streams the method names, each declared by the spec."""
    spec, issues = loaded.spec, []
    options = {k: v for k, v in spec.method.model_dump().items() if isinstance(v, str) and k != "kind"}

    def issue(name: str, what: str, known) -> None:
        keys = [k for k, v in options.items() if v == name]
        loc = ("method", keys[0]) if keys else ("method",)
        issues.append(
            Issue(
                f"method {spec.method.kind!r} {what} {name!r}, which the spec does not declare",
                ".".join(loc),
                *loaded.where(loc),
                did_you_mean(name, known) if known else None,
            )
        )

    declared, streams = spec.all_networks(), spec.data.all_streams()
    for name in spec.method.networks(spec):
        if name not in declared:
            issue(name, "trains a network", declared)
    for name in spec.method.streams(spec):
        if name not in streams:
            issue(name, "reads a data stream", streams)
    return issues


def analyze_spec(loaded) -> dict[str, NetworkPlan]:
    """Check and analyze every network, and how they fit the data, the method and each other."""
    spec, plans = loaded.spec, {}
    issues = _method_references(loaded)
    if issues:
        raise SpecError(issues)
    trained = spec.method.networks(spec)
    for which in spec.all_networks():
        if which not in trained:
            path = spec.network_path(which)
            file, line = loaded.where(tuple(path.split(".")))
            issues.append(
                Issue(
                    f"network {which!r} is not trained by method {spec.method.kind!r}",
                    path,
                    file,
                    line,
                    f"method {spec.method.kind!r} trains {', '.join(trained)}; remove the network or name it in "
                    "the method's options",
                )
            )
            continue
        try:
            plans[which] = analyze_network(loaded, which)
        except SpecError as exc:
            issues.extend(exc.issues)
    issues.extend(spec.method.check(spec, plans, loaded.where))
    if issues:
        raise SpecError(issues)
    return plans


def output_warnings(loaded) -> list[Issue]:
    """Advice, not errors: a generator whose output node is not bounded to [-1, 1] (a tanh) while
    the real images are scaled to [-1, 1] (ganhacks tip 1; ProGAN's linear output is a deliberate
    exception)."""
    spec, found = loaded.spec, []
    for name, need in spec.method.networks(spec).items():
        net = spec.all_networks().get(name)
        if need.role != "generator" or net is None:
            continue
        for out in net.output:
            node_name = out.partition(".")[0]
            node = net.nodes.get(node_name)
            if node is not None and not node.bounded_output():
                path = f"{spec.network_path(name)}.nodes.{node_name}"
                file, line = loaded.where(tuple(path.split(".")))
                found.append(
                    Issue(
                        f"the output of {name} ({node.kind}) is not bounded to [-1, 1], the range of the real images",
                        path,
                        file,
                        line,
                        "end the generator with a tanh (kind: tanh) unless the method needs a linear output",
                    )
                )
    return found


def instantiate(loaded, plan: NetworkPlan, device: str | torch.device = "cpu") -> GraphModule:
    """Build the analyzed network with real, initialized weights on `device`."""
    ctx = context(loaded.spec, plan.which, meta=torch.device(device).type == "meta")
    modules = {}
    with torch.device(device):
        growth = plan.growth
        for name, instances in plan.instances.items():
            built = [inst.build(dict(shapes), ctx.for_node(inst)) for inst, shapes in instances]
            if growth is not None and name in growth.per_stage:
                modules[name] = nn.ModuleList(built)  # one per stage
            elif len(built) > 1 or (growth is not None and name == growth.chain):
                modules[name] = Chain(built)
            else:
                modules[name] = built[0]
    return GraphModule(modules, plan)


def build_network(loaded, which: str, device: str | torch.device = "cpu", *, compile: bool = True) -> GraphModule:
    """Analyze, instantiate (in the memory format of `compile.channels_last`) and, when the spec's
    `compile.enabled` says so (and `compile` is not False, for a caller that copies the module
    first), torch.compile a network."""
    module = instantiate(loaded, analyze_network(loaded, which), device)
    to_memory_format(module, loaded.spec.compile)
    return compile_network(module, loaded.spec.compile) if compile else module


def to_memory_format(module: GraphModule, settings) -> GraphModule:
    """Run the network's feature maps channels-last when `settings.channels_last`: its 4-D inputs
    and node outputs are made channels-last (a no-op for those that already are: convolutions
    given a channels-last input return one, and element-wise ops, norms, pooling and upsampling
    keep the format, so in practice the image inputs and reshapes convert). The weights keep their
    layout: DeepSpeed views them as bytes to broadcast them, which needs a contiguous last dimension,
    and ZeRO 1/2 flatten them anyway; the convolution follows the input's format."""
    module.channels_last = settings.channels_last
    return module


def compile_network(module: GraphModule, settings) -> GraphModule:
    """torch.compile in place when `settings.enabled` (state-dict keys unchanged).

    `scope: regional` compiles each node that holds weights (each instance of a repeated node, each
    stage's converter) on its own; blocks of one class with the same settings and shapes share one
    compiled graph (the shapes are static, so each resolution of a repeated block compiles once per
    way a step calls it). `scope: whole` compiles `GraphModule.forward`: G and D share its code
    object, and without `dynamic=False` the second network would look like a shape change and
    recompile dynamically.

    A growing network compiles once per stage and fade-in (its stage and fading are Python
    attributes the graph is specialised on; alpha is a tensor, so a phase never recompiles), and
    each of those a few times over for the ways a step calls it (with or without gradients, on
    inputs that need them or not). dynamo's limit of recompilations per function (8 by default)
    is raised to cover what a network can ask of one function."""
    if not settings.enabled:
        return module
    import torch._dynamo

    regions = [module] if settings.scope == "whole" else _regions(module)
    phases = 2 * module.growth.num_stages - 1 if module.growth is not None else 1
    # the most compiled graphs one forward's code object may hold: one per way a step calls it, per
    # phase, per instance sharing the code (regional: the instances of one class)
    sharing = max(Counter(type(r).forward for r in regions).values(), default=1)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILES_PER_PHASE * phases * sharing)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)
    mode = {"mode": settings.mode} if settings.backend == "inductor" else {}
    for region in regions:
        region.compile(backend=settings.backend, fullgraph=settings.fullgraph, dynamic=False, **mode)
    return module


def _regions(module: GraphModule) -> list[nn.Module]:
    """The modules regional compilation compiles: every node module holding weights, and each
    instance of a repeated node or per-stage converter. Parameter-free nodes (wiring, activations)
    run eagerly: a compiled call of one element-wise op costs more than the op."""
    found = []
    for node in module.values():
        for m in node if isinstance(node, nn.ModuleList) else (node,):  # Chain is a ModuleList too
            if next(m.parameters(), None) is not None:
                found.append(m)
    return found
