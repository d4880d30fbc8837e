"""Data: WebDataset shards (`shards`), the embedded demo data (`demo`), the DALI input pipeline
(`dali`) and the shard checker (`check`).

Submodules are imported where they are used: DALI and torch are heavy, PIL and scikit-learn are
not needed to validate a spec.
"""

DEMO_SHARDS = "shards/demo"  # where `just demo-data` and `just train` write the demo shards (working directory)
DEMO_DOMAIN_SHARDS = "shards/digits_ab"  # the two-domain demo shards, OUT/a and OUT/b (`pipeline.data.domains`)
