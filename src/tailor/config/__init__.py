"""The training config: its sections (sections.py), TrainConfig over them (train.py), and YAML in and out
(yaml_io.py). Everything a caller needs is importable from here."""

from tailor.config.train import (
    FIELD_SECTION,
    ConfigError,
    Sections,
    TrainConfig,
    field_names,
    field_types,
)
from tailor.config.yaml_io import coerce_field, load_config, parse_assignments, read_yaml_config, save_config

__all__ = ["FIELD_SECTION", "ConfigError", "Sections", "TrainConfig", "coerce_field", "field_names",
           "field_types", "load_config", "parse_assignments", "read_yaml_config", "save_config"]
