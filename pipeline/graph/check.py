"""The shape checker of a network spec: the DAG checked for structure, every node built and run
on the meta device (no weight storage) to infer the next node's input shape, with parameters
and forward FLOPs counted by `torch.utils.flop_counter` (convolutions and matrix products, 2 per
multiply-add, so reports compare with public figures); `analyze_spec` checks a whole spec."""

from __future__ import annotations

import math
import sys
import types
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.blocks.layers import SpectralNorm
from pipeline.blocks.registry import BlockError, Node, Shape
from pipeline.errors import Issue, SpecError, did_you_mean
from pipeline.graph.growth import GrowthAnalysis
from pipeline.graph.module import Chain, GraphModule
from pipeline.graph.plan import (
    PROBE_BATCH,
    NetworkPlan,
    Row,
    _shape_str,
    combined,
    context,
    gather,
    graph_inputs,
)

if TYPE_CHECKING:
    from pipeline.spec.load import LoadedSpec

# Bounds on absurd sizes, checked during analysis (on meta, so nothing is allocated): far above any
# published GAN (BigGAN-deep 512 has ~56M parameters per network, ~34M values in its largest
# activation per image), far below what would overflow torch's size arithmetic.
MAX_PARAMS = 100_000_000_000
MAX_ACTIVATION = 1 << 31  # values in one node's output, per image
SIZE_HINT = "a size this large is a typo (an extra zero?) or a unit mistake; check channel and feature counts"


class _Checker(GrowthAnalysis):
    def __init__(self, loaded: LoadedSpec, which: str):
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


def analyze_network(loaded: LoadedSpec, which: str) -> NetworkPlan:
    checker = _Checker(loaded, which)
    inputs = graph_inputs(loaded, which)
    with _NoDynamoImport():
        plan = checker.analyze(inputs)
    if checker.issues:
        raise SpecError(checker.issues)
    assert plan is not None  # None only with issues, raised above
    return plan


def _method_references(loaded: LoadedSpec) -> list[Issue]:
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


def analyze_spec(loaded: LoadedSpec) -> dict[str, NetworkPlan]:
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


def output_warnings(loaded: LoadedSpec) -> list[Issue]:
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
