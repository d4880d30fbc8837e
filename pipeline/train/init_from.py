"""`train.init_from`: a new run's networks start from exported weights (a run's export, or
`import-weights`' output) instead of a random init; the optimizers start afresh at step 0.

Each network NAME takes EXPORT/NAME-train.safetensors where there is one (its own weights beside an
EMA), else EXPORT/NAME.safetensors (the EMA where the source kept one: all a run's export holds);
its EMA takes EXPORT/NAME.safetensors when that is a separate file, else starts as a copy of the
network, as every EMA does. A network the export lacks (a generator-only release has no D)
keeps its random init, and the log says so.

A source trained on another number of classes is refused unless `train.init_classes` says what
to do with the class-indexed tables (every embedding with one row per class: G's shared
embedding, D's projection, SAGAN's per-class BN gains): `slice` keeps their first rows,
`reinit` keeps the new run's random init of them. Spectral norm's u of a sliced table is sliced
and refined by the same 15 power iterations a new layer starts with.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import yaml
from torch import nn

from pipeline.blocks.layers import SpectralNorm
from pipeline.errors import user_error
from pipeline.runs import EXPORT_SPEC, Run, is_export, trained_weights
from pipeline.safe_files import read_tensors

if TYPE_CHECKING:
    from pipeline.spec.schema import Spec

OPTION = "train.init_from"


def export_dir(path: str) -> Path:
    """The export directory PATH names: itself, or a run directory's export/."""
    p = Path(path)
    for candidate in (p, Run(p).export):
        if is_export(candidate):
            return candidate
    raise user_error(
        f"{path} is not an export directory (spec.yaml beside NAME.safetensors) nor a run directory with one",
        path=OPTION,
        hint="give RUN/export of a finished run, or the --out folder of `import-weights`",
    )


def source_classes(export: Path) -> int | None:
    """data.num_classes of the spec the weights were trained with (None: it does not say)."""
    try:
        data = yaml.safe_load((export / EXPORT_SPEC).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise user_error(f"cannot read {export / EXPORT_SPEC}: {exc}", path=OPTION) from None
    classes = data.get("data", {}).get("num_classes") if isinstance(data, dict) else None
    return classes if isinstance(classes, int) else None


def _class_keys(net: nn.Module, num_classes: int) -> dict[str, nn.Embedding]:
    """State keys of the tables with one row per class (weight and spectral norm's u), by key."""
    out: dict[str, nn.Embedding] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == num_classes:
            prefix = f"{name}." if name else ""
            for key in (f"{prefix}weight", f"{prefix}parametrizations.weight.original"):
                out[key] = m
            out[f"{prefix}parametrizations.weight.0._u"] = m
    return out


def _fit(
    net: nn.Module, weights: dict[str, torch.Tensor], file: Path, classes: tuple[int | None, int], mode: str | None
) -> tuple[dict[str, torch.Tensor], list[nn.Embedding]]:
    """The source's weights fitted to the network: names and shapes checked, class tables sliced or
    left at the new init. Returns them and the sliced spectrally normalised tables."""
    target = net.state_dict()
    src_classes, dst_classes = classes
    missing, extra = sorted(set(target) - set(weights)), sorted(set(weights) - set(target))
    if missing or extra:
        raise user_error(
            f"{file} does not fit the spec's network: "
            + "; ".join(
                f"{what} {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra))
                if keys
            ),
            path=OPTION,
            hint="init_from needs weights of the same architecture as the spec (compare its spec.yaml)",
        )
    tables = _class_keys(net, dst_classes)
    fitted, sliced = {}, []
    for key, value in weights.items():
        want = target[key]
        if value.shape == want.shape:
            fitted[key] = value
            continue
        class_table = key in tables and src_classes is not None and value.shape[0] == src_classes
        if not class_table or value.shape[1:] != want.shape[1:]:
            raise user_error(
                f"{file}: {key} has shape {tuple(value.shape)}, the spec's {tuple(want.shape)}",
                path=OPTION,
                hint="init_from needs weights of the same architecture as the spec (compare its spec.yaml)",
            )
        if mode == "reinit":
            fitted[key] = want
        else:  # slice (the caller refused other cases)
            fitted[key] = value[:dst_classes]
            if key.endswith("._u"):
                sliced.append(tables[key])
    return fitted, sliced


def start(spec: Spec, nets: Mapping[str, nn.Module], *, resuming_from: Path | None, report: bool) -> dict[str, Path]:
    """A new run with `train.init_from` starts from those weights (`load_networks`); a resumed run
    from its checkpoint, `init_from` ignored (and said so). The EMA files to load once the EMAs exist."""
    if spec.train.init_from is None:
        return {}
    if resuming_from is None:
        return load_networks(spec, nets, report=report)
    if report:
        print(f"train.init_from ignored: resuming from {resuming_from}", file=sys.stderr)
    return {}


def load_networks(spec: Spec, nets: Mapping[str, nn.Module], *, report: bool) -> dict[str, Path]:
    """Load every network's weights from `train.init_from`; return the EMA files to load once the
    EMAs exist (network -> file)."""
    t = spec.train
    assert t.init_from is not None
    export = export_dir(t.init_from)
    src, dst = source_classes(export), spec.data.num_classes or 0
    if src is not None and src != dst:
        if t.init_classes is None:
            raise user_error(
                f"{export} was trained on {src} classes, this spec has data.num_classes {dst}",
                path="train.init_classes",
                hint="say what to do with the class embeddings: train.init_classes=slice (keep the first "
                f"{dst} classes' rows) or train.init_classes=reinit (start them at random)",
            )
        if t.init_classes == "slice" and dst > src:
            raise user_error(
                f"cannot slice {dst} classes out of the {src} of {export}",
                path="train.init_classes",
                hint="train.init_classes=reinit starts the class embeddings at random",
            )
    lines, emas = [], {}
    for name, net in nets.items():
        own, exported = trained_weights(export, name), export / f"{name}.safetensors"
        file = own if own.is_file() else exported if exported.is_file() else None
        if file is None:
            lines.append(f"{name}: not in the export, random init")
            continue
        with torch.no_grad():
            fitted, sliced = _fit(net, read_tensors(file), file, (src, dst), t.init_classes)
            net.load_state_dict(fitted, strict=True)
            for table in sliced:  # u of the sliced rows, refined as a new layer's is
                chain = cast(nn.ModuleDict, table.parametrizations)["weight"]
                sn, original = chain[0], chain.original  # type: ignore[index]
                assert isinstance(sn, SpectralNorm) and isinstance(original, torch.Tensor)
                sn._u.copy_(nn.functional.normalize(sn._u, dim=0, eps=sn.eps))
                sn._power_iteration(sn._matrix(original), 15)
        lines.append(f"{name} <- {file.name}")
        if file == own and exported.is_file():
            emas[name] = exported
            lines.append(f"its EMA <- {exported.name}")
    if report:
        classes = f"; class tables: {t.init_classes} ({src} -> {dst} classes)" if src not in (None, dst) else ""
        print(f"{OPTION}: {export}: {'; '.join(lines)}{classes}; optimizers fresh, step 0", file=sys.stderr)
    return emas


def load_emas(emas: dict, files: dict[str, Path], spec: Spec) -> None:
    """The EMAs' weights from the export, where it keeps them apart from the networks'."""
    if not files:
        return
    src, dst = source_classes(export_dir(spec.train.init_from or "")), spec.data.num_classes or 0
    for name, file in files.items():
        if name in emas:
            module = emas[name].module
            with torch.no_grad():
                fitted, _ = _fit(module, read_tensors(file), file, (src, dst), spec.train.init_classes)
                module.load_state_dict(fitted, strict=True)
