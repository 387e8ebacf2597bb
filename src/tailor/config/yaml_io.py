"""A TrainConfig from a YAML file and flags, and back to YAML: the flat `field: value` files users write
(examples/*.yaml) and runs write (config.yaml, read again by --resume, eval and the UI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tailor.config.train import ConfigError, TrainConfig, allowed_types, field_names
from tailor.files import atomic_write_text


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig fields; unknown keys are refused with their line numbers."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        fix = "one `field: value` per line; quote values with ':', '#', '[' or '{'." + _data_hint(path)
        raise ConfigError(f"{where}: not valid YAML ({what}). Fix the syntax there: {fix}") from None
    if values is None:
        raise ConfigError(f"{path}: the config file is empty (no settings). Write TrainConfig fields in it "
                          "(e.g. `data: my.jsonl`, see examples/lora.yaml), or leave the config argument out "
                          "and use flags.")
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ConfigError(f"{path}: the config must be a mapping of field: value, not a {kind}. "
                          f"Write one `field: value` per line (see examples/lora.yaml).{_data_hint(path)}")
    if "model_type" in values or "architectures" in values:
        raise ConfigError(f"{path} is a model's config.json, not a training config. Pass the model's "
                          f"directory with --model {path.parent}, and a YAML of TrainConfig fields (or "
                          "none).")
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    valid = set(field_names())
    unknown = [k for k in values if k not in valid]
    if unknown:
        where = "; ".join(f"{path}:{lines.get(k, '?')}: unknown key {k!r}{_did_you_mean(k)}" for k in unknown)
        raise ConfigError(f"{where}\nvalid keys: {', '.join(field_names())}{_data_hint(path)}")
    return {k: (v if not isinstance(v, list) or k != "adam_betas" else tuple(v)) for k, v in values.items()}


def _read_config_text(path: Path) -> str:
    """The text of a config file, or a ConfigError that names the path, what is wrong and the fix."""
    fix = "Give the path of a YAML file of TrainConfig fields (e.g. examples/lora.yaml)."
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ConfigError(f"{path}: is a directory, not a config file{hint}. {fix}")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found. Check the spelling and the working directory. "
                          + fix)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                          f"Save it as UTF-8 YAML.{_data_hint(path)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc}). Check that you may "
                          f"read it (ls -l). {fix}") from None


def _data_hint(path: Path) -> str:
    """A pointer to --data when the file looks like training data passed where the config goes."""
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".txt", ".parquet"):
        return f" If {path.name} is training data, pass it with --data {path}."
    return ""


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """TrainConfig from an optional YAML file, then `overrides` (None values are ignored), validated."""
    values: dict[str, Any] = read_yaml_config(path) if path else {}
    unknown = [k for k in overrides if k not in field_names()]
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(field_names())}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: coerce_field(k, v) for k, v in values.items()}
    try:
        config = TrainConfig(**values)
    except TypeError as exc:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(str(exc)) from exc
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """["lr=1e-4", "target_modules=[q_proj, v_proj]"] -> {"lr": 1e-4, ...}; values are read as YAML."""
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set warmup_steps=10")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return values


def save_config(config: TrainConfig, path: Path, note: str | None = None) -> None:
    """Write the resolved config as YAML, atomically; `note` goes above it as a comment (why a value was
    resolved so)."""
    comment = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
    atomic_write_text(path, comment + yaml.safe_dump(config.to_dict(), sort_keys=False))


def coerce_field(name: str, value: Any) -> Any:
    """Accept what YAML 1.1 and shells hand us: `2e-4` arrives as a string, ints where floats go."""
    allowed = allowed_types(name)
    if isinstance(value, str) and float in allowed and str not in allowed:
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, str) and int in allowed and str not in allowed:
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if name == "adam_betas" and isinstance(value, list):
        return tuple(value)
    return value


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, field_names(), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["coerce_field", "load_config", "parse_assignments", "read_yaml_config", "save_config"]
