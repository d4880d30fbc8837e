"""`import-weights FORMAT PATH --spec NAME --out DIR [key=value ...]`: published weights in another
codebase's format converted into the spec's networks and written as an export directory, which
`sample`, `eval` and `train.init_from` accept (pipeline/weights)."""

from __future__ import annotations

from pathlib import Path


def cmd_import_weights(ns) -> int:
    from pipeline.spec import load_spec
    from pipeline.weights import check_out, get, import_weights

    get(ns.format)  # an unknown format before the spec is loaded
    out = Path(ns.out)
    check_out(out)
    loaded = load_spec(ns.spec, ns.args)
    manifest = import_weights(ns.format, Path(ns.path), loaded, out)
    print(f"wrote {out}/ ({manifest['format']} -> spec {manifest['spec']}):")
    for name, entry in manifest["files"].items():
        print(f"  {name:32s} {entry['role']:6s} from {entry['from']}")
    if manifest["missing"]:
        print(f"  not in the source: {', '.join(manifest['missing'])}")
    print(f"  lacks: {manifest['lacks']}")
    print(f"sample it with `just sample {out}`; fine-tune from it with `just train spec=... train.init_from={out}`")
    return 0
