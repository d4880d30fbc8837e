"""Data on disk: `shards build` turns an image folder into WebDataset shards, `shards check` reads
them back and compares with the manifest, `shards index` writes missing DALI index files, and
`demo-data` writes the embedded demo shards and trains the demo classifier beside them.
"""

from __future__ import annotations

import json

from pipeline.errors import user_error


def cmd_shards_build(ns) -> int:
    from pipeline.data.shards import build_shards

    manifest = build_shards(
        ns.src,
        ns.out,
        csv=ns.csv,
        shard_size=ns.shard_size,
        resolution=ns.resolution,
        seed=ns.seed,
        quality=ns.quality,
        overwrite=ns.overwrite,
        log=print,
    )
    skipped = manifest.get("skipped", [])
    print(
        f"{ns.out}: {manifest['num_samples']:,} samples in {len(manifest['shards'])} shards, "
        f"{manifest['num_classes']} classes; {len(skipped)} image(s) skipped"
    )
    for item in skipped[:20]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return 0


def cmd_shards_check(ns) -> int:
    from pipeline.data.check import check_shards, print_report

    report = check_shards(ns.dir)
    if ns.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 2


def cmd_shards_index(ns) -> int:
    from pathlib import Path

    from pipeline.data.shards import write_index

    tars = sorted(Path(ns.dir).glob("*.tar"))
    if not tars:
        raise user_error(f"no .tar files in {ns.dir}")
    made = [t for t in tars if not t.with_suffix(".idx").exists()]
    for tar in made:
        write_index(tar)
    print(f"{ns.dir}: wrote {len(made)} index file(s); {len(tars) - len(made)} already there")
    return 0


def cmd_demo_data(ns) -> int:
    from pipeline.data.demo import build_demo_shards, demo_shards_ready
    from pipeline.eval.classifier import (
        build_domain_demo,
        demo_classifier_ready,
        domain_demo_ready,
        train_demo_classifier,
    )

    if demo_shards_ready(ns.out) and not ns.force:
        print(f"{ns.out}: demo shards already there")
    else:
        manifest = build_demo_shards(ns.out, overwrite=ns.force)
        print(f"{ns.out}: {manifest['num_samples']:,} demo samples in {len(manifest['shards'])} shards")
    if demo_classifier_ready(ns.out) and not ns.force:
        print(f"{ns.out}: demo classifier already there")
    else:
        record = train_demo_classifier(ns.out)
        print(
            f"{ns.out}: demo classifier trained in {record['train_seconds']:.1f} s, held-out accuracy "
            f"{record['held_out_accuracy']:.1%} ({record['num_held_out']} samples)"
        )
    if domain_demo_ready(ns.domains_out) and not ns.force:
        print(f"{ns.domains_out}: two-domain demo shards already there")
    else:
        manifests = build_domain_demo(ns.domains_out, overwrite=ns.force)
        for domain, manifest in manifests.items():
            print(
                f"{ns.domains_out}/{domain}: {manifest['num_samples']:,} samples of domain {domain.upper()}, "
                "with its classifier"
            )
    return 0
