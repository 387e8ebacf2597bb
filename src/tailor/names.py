"""Names that several parts of tailor share and none owns more than another: the default model, the run
directory's config file, the precision and multi-process strategy choices. Plain values, no imports, so
the torch-free parts (the config, the planner, the command line) and the torch ones read the same list."""

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what `tailor train` trains when no model is named (tailor.models)
RUN_CONFIG_NAME = "config.yaml"  # the resolved training config a run directory holds
PRECISIONS = ("auto", "bf16", "fp32")  # a run's precision; tailor.hardware resolves auto
BASE_DTYPES = ("auto", "bf16", "fp32")  # the frozen base's storage dtype; tailor.hardware resolves auto
# what base_dtype auto stores a LoRA run's frozen base in at precision fp32: bf16, upcast per matmul, measured
# as fast as fp32 storage at model level (benchmarks/base_dtype.py, docs/precision.md)
BASE_DTYPE_AT_FP32 = "bf16"
STRATEGIES = ("ddp", "fsdp")  # how several training processes share the model (tailor.train.distributed)

__all__ = ["BASE_DTYPES", "BASE_DTYPE_AT_FP32", "DEFAULT_MODEL", "PRECISIONS", "RUN_CONFIG_NAME",
           "STRATEGIES"]
