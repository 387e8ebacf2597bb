"""The files of an adapter directory: PEFT's two (config and weights, or PEFT's older pickled weights),
tailor's metadata beside them, and a README. One home for the names, torch-free, so that the store (which
must stay quick for `tailor adapters list`) and the format and metadata modules read the same ones."""

CONFIG_NAME = "adapter_config.json"  # PEFT's adapter config
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's adapter weights
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older pickled weights: read, never written
METADATA_NAME = "tailor_metadata.json"  # tailor's record of the base, the run and the lineage
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, METADATA_NAME, "README.md")  # in store order

__all__ = ["ADAPTER_FILES", "CONFIG_NAME", "METADATA_NAME", "PICKLE_WEIGHTS_NAME", "WEIGHTS_NAME"]
