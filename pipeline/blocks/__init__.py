"""Block kinds. Importing this package registers every family."""

from pipeline.blocks import attention, basic, biggan, dcgan, ganhacks, progan, r3gan, translation, unet  # noqa: F401  (registration side effects)
from pipeline.blocks.registry import REGISTRY, BlockError, Node, node_union  # noqa: F401
