"""Architecture shapes (no weights) of the models people fine-tune, and readers for the other model inputs.

A model enters the planner as an :class:`Architecture`: the handful of numbers that fix every weight
shape of a decoder-only transformer. It can come from

- the built-in :data:`CATALOGUE` (values copied from each model's published ``config.json``),
- a local ``config.json`` (or a directory holding one),
- a GGUF file's header (read with the ``gguf`` package; the tensors are never loaded),
- a raw parameter count such as ``"7B"`` or ``7e9``, mapped onto a generic Llama-like shape.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path


class PlanError(ValueError):
    """Bad input to the planner; the message lists every problem and how to fix it."""


@dataclass(frozen=True)
class Architecture:
    """Shape of a decoder-only transformer. Every count in params.py is derived from these fields."""

    name: str
    model_type: str  # transformers model_type: llama, mistral, qwen2, gemma2, phi3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v
    norms_per_layer: int = 2  # Gemma-2 has four RMSNorms per block (pre and post, attention and MLP)
    fused_qkv: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    max_position_embeddings: int = 4096
    num_experts: int = 0  # mixture-of-experts: experts per layer (0: a dense MLP)
    moe_intermediate_size: int = 0  # each expert's MLP width (Mixtral: intermediate_size)
    qk_norm: bool = False  # Qwen3(-MoE): RMSNorms of head_dim on q and k in every layer
    source: str = "catalogue"  # where the shape came from, shown in the output
    published_params: int | None = None  # the total the model card / HF reports, when known
    assumption: str | None = None  # stated when the shape was guessed (raw parameter count)
    extra_hf: dict = field(
        default_factory=dict, compare=False
    )  # config keys needed to rebuild in transformers

    def hf_config_dict(self) -> dict:
        """A transformers config dict with the same shapes (used by the tests' meta-device oracle)."""
        cfg = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
        }
        if self.num_experts:
            cfg["num_local_experts" if self.model_type == "mixtral" else "num_experts"] = self.num_experts
            if self.model_type != "mixtral":
                cfg["moe_intermediate_size"] = self.moe_intermediate_size
        cfg.update(self.extra_hf)
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra_hf")
        return d


def _arch(
    name: str,
    model_type: str,
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    tied: bool,
    published: int,
    head_dim: int | None = None,
    **kw,
) -> Architecture:
    return Architecture(
        name=name,
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim or hidden // heads,
        tie_embeddings=tied,
        published_params=published,
        **kw,
    )


# Values from each model's config.json on the Hugging Face hub; `published` is the total the hub's
# safetensors index / model card reports. tests/test_plan_params.py rebuilds each one in transformers on
# the meta device and checks the count.
_ENTRIES = [
    _arch("Llama-2-7B", "llama", 32000, 4096, 11008, 32, 32, 32, False, 6_738_415_616),
    _arch("Llama-2-13B", "llama", 32000, 5120, 13824, 40, 40, 40, False, 13_015_864_320),
    _arch("Llama-2-70B", "llama", 32000, 8192, 28672, 80, 64, 8, False, 68_976_648_192),
    _arch(
        "Llama-3.1-8B",
        "llama",
        128256,
        4096,
        14336,
        32,
        32,
        8,
        False,
        8_030_261_248,
        max_position_embeddings=131072,
    ),
    _arch(
        "Llama-3.1-70B",
        "llama",
        128256,
        8192,
        28672,
        80,
        64,
        8,
        False,
        70_553_706_496,
        max_position_embeddings=131072,
    ),
    _arch(
        "Mistral-7B",
        "mistral",
        32000,
        4096,
        14336,
        32,
        32,
        8,
        False,
        7_241_732_096,
        max_position_embeddings=32768,
    ),
    _arch(
        "Qwen2.5-0.5B",
        "qwen2",
        151936,
        896,
        4864,
        24,
        14,
        2,
        True,
        494_032_768,
        qkv_bias=True,
        max_position_embeddings=32768,
    ),
    _arch(
        "Qwen2.5-7B",
        "qwen2",
        152064,
        3584,
        18944,
        28,
        28,
        4,
        False,
        7_615_616_512,
        qkv_bias=True,
        max_position_embeddings=32768,
    ),
    _arch(
        "Qwen2.5-72B",
        "qwen2",
        152064,
        8192,
        29568,
        80,
        64,
        8,
        False,
        72_706_203_648,
        qkv_bias=True,
        max_position_embeddings=32768,
    ),
    _arch(
        "Gemma-2-9B",
        "gemma2",
        256000,
        3584,
        14336,
        42,
        16,
        8,
        True,
        9_241_705_984,
        head_dim=256,
        norms_per_layer=4,
        max_position_embeddings=8192,
    ),
    _arch(
        "Phi-3-mini",
        "phi3",
        32064,
        3072,
        8192,
        32,
        32,
        32,
        False,
        3_821_079_552,
        fused_qkv=True,
        extra_hf={"pad_token_id": 32000},
    ),
    _arch(
        "SmolLM2-135M", "llama", 49152, 576, 1536, 30, 9, 3, True, 134_515_008, max_position_embeddings=8192
    ),
    _arch(
        "SmolLM2-360M", "llama", 49152, 960, 2560, 32, 15, 5, True, 361_821_120, max_position_embeddings=8192
    ),
    _arch(
        "SmolLM2-1.7B",
        "llama",
        49152,
        2048,
        8192,
        24,
        32,
        32,
        True,
        1_711_376_384,
        max_position_embeddings=8192,
    ),
]
CATALOGUE: dict[str, Architecture] = {a.name: a for a in _ENTRIES}

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral", "qwen3_moe")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def catalogue_lookup(name: str) -> Architecture | None:
    """Catalogue entry by name, ignoring case, dashes and an -Instruct/-Chat/-hf suffix."""
    key = _normalise(name.split("/")[-1])
    key = re.sub(r"(instruct|chat|hf|it|v0\.\d|4kinstruct|4k|128k)+$", "", key)
    for arch in _ENTRIES:
        if _normalise(arch.name) == key:
            return arch
    return None


def catalogue_help() -> str:
    names = ", ".join(CATALOGUE)
    return (
        f"Known models: {names}. Or pass a local config.json (or a directory holding one), a .gguf "
        "file, or a raw parameter count such as 7B or 7e9."
    )


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parse_param_count(text: str) -> float | None:
    """'7B' -> 7e9, '135M' -> 1.35e8, '7e9' -> 7e9; None if `text` is not a count."""
    m = _COUNT.match(text)
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    return value if value >= 1e6 else None


def architecture_from_param_count(n: float) -> Architecture:
    """A generic Llama-like shape with about `n` parameters.

    Assumptions (stated in the output): vocabulary 32,000, untied embeddings, head size 128, MLP width
    8/3 * hidden rounded up to a multiple of 256, no GQA, depth/width ratio of Llama-2 (hidden = 128 *
    layers). We solve for the layer count whose total is closest to `n`.
    """
    best = None
    for layers in range(2, 161):
        hidden = 128 * layers
        inter = int(math.ceil(8 * hidden / 3 / 256) * 256)
        total = 2 * 32000 * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden
        if best is None or abs(total - n) < abs(best[0] - n):
            best = (total, layers, hidden, inter)
    _, layers, hidden, inter = best
    return Architecture(
        name=f"generic-{_human(n)}",
        model_type="llama",
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=hidden // 128,
        num_kv_heads=hidden // 128,
        head_dim=128,
        tie_embeddings=False,
        source=f"raw parameter count {n:.3g}",
        assumption=(
            "generic Llama-like shape: vocab 32000, untied embeddings, head_dim 128, no GQA, "
            "hidden = 128 x layers, MLP 8/3 x hidden (SwiGLU); "
            f"{layers} layers x hidden {hidden} is the closest such shape"
        ),
    )


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def architecture_from_hf_config(cfg: dict, source: str) -> Architecture:
    """Architecture from a transformers config.json dict; refuses model types it cannot count exactly."""
    mt = cfg.get("model_type")
    if mt not in _SUPPORTED_MODEL_TYPES:
        raise PlanError(
            f"{source}: model_type {mt!r} is not supported by the planner; supported: "
            f"{', '.join(_SUPPORTED_MODEL_TYPES)}. Pass a raw parameter count (e.g. 7B) instead."
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if k not in cfg
    ]
    if missing:
        raise PlanError(f"{source}: config lacks {', '.join(missing)}")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    default_tied = mt in ("gemma2",)
    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)  # transformers 5 / hub
    if mt == "qwen3_moe" and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
        raise PlanError(f"{source}: Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) "
                        "is not counted by the planner; pass a raw parameter count instead.")
    moe_width = cfg.get("moe_intermediate_size") if mt == "qwen3_moe" else cfg["intermediate_size"]
    extra = (
        {"pad_token_id": cfg["pad_token_id"]} if mt == "phi3" and cfg.get("pad_token_id") is not None else {}
    )
    return Architecture(
        name=cfg.get("_name_or_path") or Path(source).parent.name or source,
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", default_tied)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        norms_per_layer=4 if mt == "gemma2" else 2,
        fused_qkv=mt == "phi3",
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        num_experts=num_experts if mt in ("mixtral", "qwen3_moe") else 0,
        moe_intermediate_size=int(moe_width or 0) if mt in ("mixtral", "qwen3_moe") else 0,
        qk_norm=mt == "qwen3_moe",
        source=source,
        extra_hf=extra,
    )


def architecture_from_gguf(path: str | os.PathLike) -> Architecture:
    """Architecture from a GGUF header (metadata and tensor table; tensor data is not read).

    GGUFReader parses every metadata array (a 49k-entry vocabulary takes seconds), so results are cached
    per (path, size, mtime)."""
    p = Path(path).resolve()
    stat = p.stat()
    return _architecture_from_gguf(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _architecture_from_gguf(path: str, size: int, mtime_ns: int) -> Architecture:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = value("general.architecture")
    if arch not in ("llama", "qwen2", "gemma2", "phi3"):
        raise PlanError(
            f"{path}: GGUF architecture {arch!r} is not supported by the planner; "
            "supported: llama, qwen2, gemma2, phi3"
        )
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = value(f"{arch}.embedding_length")
    vocab = value(f"{arch}.vocab_size") or int(embd.shape.tolist()[1])
    heads = value(f"{arch}.attention.head_count")
    head_dim = value(f"{arch}.attention.key_length") or hidden // heads
    return Architecture(
        name=str(value("general.name") or Path(path).stem),
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        num_layers=int(value(f"{arch}.block_count")),
        num_heads=int(heads),
        num_kv_heads=int(value(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        norms_per_layer=4 if arch == "gemma2" else 2,
        fused_qkv=arch == "phi3",
        max_position_embeddings=int(value(f"{arch}.context_length") or 4096),
        source=f"GGUF header {path}",
    )


def resolve_model(spec: str) -> Architecture:
    """Turn --model's value into an Architecture (catalogue name, config.json, GGUF file, or a count)."""
    arch = catalogue_lookup(spec)
    if arch is not None:
        return arch
    if spec in ("SmolLM2-135M-Instruct", "default"):
        return CATALOGUE["SmolLM2-135M"]
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        if path.suffix == ".gguf":
            return architecture_from_gguf(path)
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: not a readable config.json ({e}). {catalogue_help()}") from e
        return architecture_from_hf_config(cfg, str(path))
    n = parse_param_count(spec)
    if n is not None:
        return architecture_from_param_count(n)
    raise PlanError(f"unknown model {spec!r}. {catalogue_help()}")
