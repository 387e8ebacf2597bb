"""Names that several parts of tailor share and none owns more than another: the default model, the run
directory's config file, the precision and multi-process strategy choices. Plain values, no imports, so
the torch-free parts (the config, the planner, the command line) and the torch ones read the same list."""

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what `tailor train` trains when no model is named (tailor.models)
RUN_CONFIG_NAME = "config.yaml"  # the resolved training config a run directory holds
# (tailor/ui/runs.py still spells "config.yaml" out in MARKERS and its file list: to read it from here.)
PRECISIONS = ("auto", "bf16", "fp32")  # a run's precision; tailor.hardware resolves auto
BASE_DTYPES = ("auto", "bf16", "fp32")  # the frozen base's storage dtype; tailor.hardware resolves auto
# what base_dtype auto stores a LoRA run's frozen base in at precision fp32. fp32 until bf16 storage (upcast
# per matmul: half the frozen bytes) is measured as fast on a quiet AVX2 machine, where fp32 runs: on a busy
# AVX512-BF16 one its LoRA step took 0.98x and its replay/KL base pass 0.98-1.37x fp32 storage's time
# (benchmarks/base_dtype.py, docs/precision.md); `--base-dtype bf16` chooses it today
BASE_DTYPE_AT_FP32 = "fp32"
STRATEGIES = ("ddp", "fsdp")  # how several training processes share the model (tailor.train.distributed)

# what a run learns (TrainConfig.objective; tailor.loss.preference): the answers, or preferences between two
OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE_LOSSES = ("sigmoid", "ipo")  # DPO's loss variants

__all__ = ["BASE_DTYPES", "BASE_DTYPE_AT_FP32", "DEFAULT_MODEL", "OBJECTIVES", "PRECISIONS",
           "PREFERENCE_LOSSES", "RUN_CONFIG_NAME", "STRATEGIES"]
