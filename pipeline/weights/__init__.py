"""Published weights in other codebases' formats, converted into this project's networks and
written as an export directory (`just import-weights FORMAT PATH --spec NAME --out DIR`), which
`sample`, `eval` and `train.init_from` read like a run's export:

    DIR/spec.yaml                    the spec the weights belong to, resolved (as a run exports it)
    DIR/NETWORK.safetensors          the generator to sample: the EMA where the source has one
    DIR/NETWORK-train.safetensors    the generator's own (not averaged) weights, where both are given
    DIR/NETWORK.safetensors          likewise the discriminator, where the source has one
    DIR/import.json                  what came from which file (with its sha256), what was missing

A format is a module with `FILES` (role -> file name; roles G, G_ema, D), `HOLDS`, `LACKS` and
`convert(states, loaded) -> {role: state_dict}` (states: each file read as tensors, by role).
A single-file format may instead define `convert(state, loaded) -> {"G": state_dict}`; the
registry then passes the one state. Modules are imported when used, so that a format whose
module is absent says so instead of breaking the others.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pipeline.errors import SpecError, did_you_mean, user_error
from pipeline.runs import EXPORT_SPEC, trained_weights
from pipeline.safe_files import sha256

if TYPE_CHECKING:
    from pipeline.spec.load import LoadedSpec

MANIFEST = "import.json"


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # imported on use
    summary: str  # what it is, in a line (shown when the module is absent)

    def load(self) -> ModuleType:
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and self.module.startswith(exc.name):
                raise user_error(
                    f"format {self.name!r} ({self.summary}) is not available in this version: {self.module} is missing",
                    hint=f"known formats: {', '.join(FORMATS)}",
                ) from None
            raise


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "biggan-pytorch",
            "pipeline.weights.biggan_pytorch",
            "ajbrock/BigGAN-PyTorch's G.pth, G_ema.pth, D.pth (BigGAN, BigGAN-deep)",
        ),
        Format(
            "pretrained-biggan",
            "pipeline.weights.pretrained_biggan",
            "huggingface/pytorch-pretrained-BigGAN's pytorch_model.bin (the TF-Hub BigGAN-deep generators)",
        ),
    )
}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise user_error(f"unknown weights format {name!r}", hint=did_you_mean(name, FORMATS))
    return FORMATS[name]


# ----- reading the source -----
def source_files(module: ModuleType, path: Path) -> tuple[dict[str, Path], list[str]]:
    """The source's files by role, and the file names it lacks. PATH is a folder holding some of
    the format's files, or one of those files (any name for a single-file format)."""
    files: dict[str, str] = module.FILES
    if not path.exists():
        raise user_error(f"{path} does not exist", hint=f"give a folder holding {', '.join(files.values())}")
    if path.is_file():
        if len(files) == 1:
            return {next(iter(files)): path}, []
        role = next((r for r, name in files.items() if name == path.name), None)
        if role is None:
            raise user_error(
                f"{path} is none of the format's files ({', '.join(files.values())})",
                hint="give the folder holding them, or one of them by its name",
            )
        return {role: path}, [n for r, n in files.items() if r != role]
    found = {role: path / name for role, name in files.items() if (path / name).is_file()}
    if not found:
        raise user_error(
            f"{path} holds none of the format's files ({', '.join(files.values())})",
            hint="give the folder the checkpoint was saved in (BigGAN-PyTorch: weights/EXPERIMENT/)",
        )
    return found, [name for role, name in files.items() if role not in found]


def read_source(path: Path) -> object:
    """A file as tensors, never running code (weights_only)."""
    from pipeline.safe_files import read_torch

    try:
        return read_torch(path, map_location="cpu")
    except SpecError as exc:
        raise user_error(
            exc.issues[0].message, hint="expected a state dict saved with torch.save; is this the right file?"
        ) from None


# ----- converting and writing -----
def convert_files(fmt: Format, files: dict[str, Path], loaded: LoadedSpec) -> dict[str, dict[str, torch.Tensor]]:
    module = fmt.load()
    states = {role: read_source(file) for role, file in files.items()}
    if len(module.FILES) == 1:
        (state,) = states.values()
        return module.convert(state, loaded)
    return module.convert(states, loaded)


def network_of(loaded: LoadedSpec, role: str) -> str:
    spec = loaded.spec
    wanted = "discriminator" if role == "D" else "generator"
    names = [name for name, need in spec.method.networks(spec).items() if need.role == wanted]
    if len(names) != 1:
        raise user_error(f"the spec's method has {len(names)} networks in the {wanted} role; expected one")
    return names[0]


def export_layout(loaded: LoadedSpec, roles: set[str]) -> dict[str, str]:
    """role -> file name in the export directory."""
    g, d = network_of(loaded, "G"), network_of(loaded, "D") if "D" in roles else ""
    layout = {}
    if "G_ema" in roles:
        layout["G_ema"] = f"{g}.safetensors"
        if "G" in roles:
            layout["G"] = trained_weights(Path(), g).name
    elif "G" in roles:
        layout["G"] = f"{g}.safetensors"
    if "D" in roles:
        layout["D"] = f"{d}.safetensors"
    return layout


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise user_error(
            f"{out} exists and is not an empty folder",
            hint="give a new folder with --out; nothing in an existing one is replaced",
        )


def import_weights(format_name: str, path: Path, loaded: LoadedSpec, out: Path) -> dict:
    """Convert PATH into an export directory OUT, written under a temporary name and renamed
    when complete; return the manifest (also written as OUT/import.json)."""
    from safetensors.torch import save_file

    fmt = get(format_name)
    module = fmt.load()
    check_out(out)
    files, missing = source_files(module, path)
    converted = convert_files(fmt, files, loaded)
    layout = export_layout(loaded, set(converted))
    manifest = {
        "format": fmt.name,
        "spec": loaded.spec.name,
        "files": {
            layout[role]: {"role": role, "from": str(files[role]), "sha256": sha256(files[role])}
            for role in converted
            if role in files
        },
        "missing": missing,
        "holds": module.HOLDS,
        "lacks": module.LACKS,
    }
    if len(module.FILES) == 1:  # a single-file format: every network came from the one file
        (file,) = files.values()
        manifest["files"] = {layout[r]: {"role": r, "from": str(file), "sha256": sha256(file)} for r in converted}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's private one
    try:
        for role, state in converted.items():
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / layout[role])
        import yaml

        (tmp / EXPORT_SPEC).write_text(yaml.safe_dump(loaded.spec.resolved(), sort_keys=False))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
