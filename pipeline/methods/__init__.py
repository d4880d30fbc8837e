"""Training methods. Importing this package registers every method."""

from pipeline.methods import cycle, gan, progressive  # noqa: F401  (registration side effects)
from pipeline.methods.registry import (  # noqa: F401
    METHODS,
    Method,
    MethodRun,
    NetworkNeed,
    Phase,
    describe,
    method_union,
)
