from pipeline.spec.load import LoadedSpec, load_spec, resolve_spec_path  # noqa: F401
from pipeline.spec.schema import Spec  # noqa: F401
