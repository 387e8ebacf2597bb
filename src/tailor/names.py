"""Names that several parts of tailor share and none owns more than another: the default model, the run
directory's config file, the precision and multi-process strategy choices. Plain values, no imports, so
the torch-free parts (the config, the planner, the command line) and the torch ones read the same list."""

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what `tailor train` trains when no model is named (tailor.models)
RUN_CONFIG_NAME = "config.yaml"  # the resolved training config a run directory holds
# (tailor/ui/runs.py still spells "config.yaml" out in MARKERS and its file list: to read it from here.)
PRECISIONS = ("auto", "bf16", "fp32")  # a run's precision; tailor.hardware resolves auto
STRATEGIES = ("ddp", "fsdp")  # how several training processes share the model (tailor.train.distributed)

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "RUN_CONFIG_NAME", "STRATEGIES"]
