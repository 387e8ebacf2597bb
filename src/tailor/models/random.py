"""Random-weight models at a real architecture's size, written as `save_pretrained` writes them.

Why: tailor never downloads weights, yet memory and speed at 1.7B or 7B parameters must be measured on real
shapes. A model built here has the real `config.json` (SmolLM2-1.7B, Llama-2-7B, ...), the default model's
tokenizer, and random weights in bf16 safetensors shards with a `model.safetensors.index.json`, so every
loader (tailor's, transformers', PEFT's) reads it like a downloaded checkpoint.

The weights are written tensor by tensor, shard by shard: building a 7B model needs about one shard of
memory (2 GiB), not the model's 13 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from tailor.files import atomic_output

SHARD_BYTES = 2 * 1024**3


def _random_tensor(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, the rest N(0, std^2): the shapes and scales of an initialised model."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * std


def write_random_model(config: PretrainedConfig, directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, shard_bytes: int = SHARD_BYTES,
                       tokenizer_from: str | None = None) -> Path:
    """Write a model of `config`'s architecture with random weights in `dtype` to `directory` (atomically:
    a half-written model never appears). The tokenizer is `tokenizer_from`'s (default: tailor's default
    model). Returns the directory."""
    from tailor.models.load import DEFAULT_MODEL, load_tokenizer

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # named_parameters lists a tied weight once, under the name save_pretrained keeps
    shapes = [(name, p.shape) for name, p in skeleton.named_parameters()]
    std = float(getattr(config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    with atomic_output(directory, directory=True) as tmp:
        from safetensors.torch import save_file

        weight_map: dict[str, str] = {}
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        total = 0

        def flush() -> None:
            index = len(set(weight_map.values()))
            save_file(shards[-1], str(Path(tmp) / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update({key: f"part-{index:05d}.safetensors" for key in shards[-1]})

        for name, shape in shapes:
            tensor = _random_tensor(name, shape, std, generator).to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                flush()
                shards[-1], sizes[-1] = {}, 0
            shards[-1][name] = tensor
            sizes[-1] += nbytes
            total += nbytes
        flush()
        count = len(set(weight_map.values()))
        renamed = {}
        for index in range(count):  # the names save_pretrained gives shards
            old = Path(tmp) / f"part-{index:05d}.safetensors"
            new = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            old.rename(Path(tmp) / new)
            renamed[old.name] = new
        weight_map = {key: renamed[file] for key, file in weight_map.items()}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        config.dtype = dtype
        config.save_pretrained(tmp)
        load_tokenizer(tokenizer_from or DEFAULT_MODEL).save_pretrained(tmp)
    return directory


__all__ = ["write_random_model"]
