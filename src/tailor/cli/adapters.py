"""`tailor combine`, `merge` and `adapters ...`: adapters as artifacts (combined, folded into their base,
kept in the store with versions and tags)."""

from __future__ import annotations

from pathlib import Path

import typer
import typer.core

from tailor.cli.app import FORCE_HELP, MODEL_HELP, STORE_HELP, app, fail


class _ManyValues(typer.core.TyperCommand):
    """`--adapters A B --weights 0.7 0.3`: click options take one value each, so the values after one of
    these flags (up to the next --flag) are given that flag again before click parses them."""

    many = ("--adapters", "--weights")

    def parse_args(self, ctx, args):  # noqa: D102 - click's hook
        rewritten: list[str] = []
        current = None
        for token in args:
            if token.startswith("--"):
                current = token if token in self.many else None
            elif current is not None and rewritten[-1] != current:
                rewritten.append(current)
            rewritten.append(token)
        return super().parse_args(ctx, rewritten)


@app.command("combine", cls=_ManyValues)
def combine_command(
    adapters: list[str] = typer.Option(..., "--adapters", help="adapter directories or store references "
                                       "(NAME@VERSION, NAME@TAG): --adapters DIR1 DIR2 ..."),
    weights: list[float] = typer.Option(..., "--weights", help="one weight per adapter, e.g. 0.7 0.3 "
                                        "(negative subtracts)"),
    method: str = typer.Option("cat", "--method", help="cat (exact) | linear (PEFT's, approximate) | svd "
                               "(exact sum cut to --rank) | ties | dare"),
    out: str = typer.Option(..., "--out", help="directory for the combined adapter (PEFT format)"),
    rank: int | None = typer.Option(None, "--rank", help="target rank of svd, ties, dare (default: svd the "
                                    "largest parent rank; ties/dare the sum)"),
    density: float = typer.Option(0.5, "--density", help="ties/dare: share of each update's entries kept"),
    seed: int = typer.Option(0, "--seed", help="dare: seed of the random drop"),
    force: bool = typer.Option(False, "--force", help="combine adapters whose recorded bases differ"),
    register: str | None = typer.Option(None, "--register", help="also add the result to the store as NAME"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="overall error only, not one line per module"),
) -> None:
    """Combine adapters of one base into one PEFT-format adapter (no base model needed); prints the
    relative error of the result against the weighted sum of the adapters' updates, per module and overall."""
    from tailor.adapters.combine import combine_adapters, format_result
    from tailor.adapters.store import AdapterStore, check_name, locate

    try:
        if register:
            check_name(register)
        located = [locate(a, store) for a in adapters]
        result = combine_adapters([p for p, _ in located], weights, method, out, rank, density=density,
                                  seed=seed, force=force, refs=[r for _, r in located], store=store)
        format_result(result, typer.echo, per_layer=not quiet)
        if register:
            ref, created = AdapterStore(store).add(register, out)
            typer.echo(f"{'registered as' if created else 'already in the store as'} {ref}")
    except (ValueError, OSError) as error:
        fail(error)


@app.command("merge")
def merge_command(
    adapter: str = typer.Option(..., "--adapter", help="adapter directory or store reference (NAME@TAG)"),
    out: str = typer.Option(..., "--out", help="output: a directory (transformers), or a .gguf file "
                            "(--gguf)"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP + " (default: the adapter's base)"),
    dtype: str = typer.Option("float32", "--dtype", help="weights written: float32 (logits within 1e-4 of "
                              "the adapter's) | bfloat16 | float16"),
    base_dtype: str = typer.Option("auto", "--base-dtype", help="base weights taken as: auto (as stored) | "
                                   "float32 | bfloat16"),
    quantized: str = typer.Option("auto", "--quantized", help="base quantization the adapter was trained "
                                  "on: auto (from its metadata) | none | nf4 | int8 (dequantized before "
                                  "merging)"),
    gguf: bool = typer.Option(False, "--gguf", help="write one GGUF file instead (llama, mistral, qwen2, "
                              "qwen3, gemma2, gemma3, phi3)"),
    lora_only: bool = typer.Option(False, "--lora-only", help="with --gguf / --ollama: write the adapter "
                                   "alone, as llama.cpp's LoRA GGUF (llama-cli --lora, Ollama ADAPTER)"),
    ollama: bool = typer.Option(False, "--ollama", help="write a directory for `ollama create`: the GGUF(s) "
                                "and a Modelfile"),
    quant: str = typer.Option("f16", "--quant", help="GGUF tensor type: f16 | q8_0 | bf16 | f32"),
    verify: str = typer.Option("float64", "--verify", help="arithmetic of the logit check: float64 (limit "
                               "1e-4; a float64 copy of the model in memory) | float32"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Fold an adapter into its base and write a plain model (transformers directory or GGUF file); checks
    on a few prompts that the result gives the adapter's logits, and prints the difference."""
    from tailor.export.merge import format_result, merge_adapter

    try:
        if ollama:
            from tailor.export.ollama import export_ollama, format_ollama_result

            result = export_ollama(adapter, out, lora_only=lora_only, model=model, quant=quant, force=force,
                                   store=store, dtype=dtype, base_dtype=base_dtype, quantized=quantized,
                                   verify=verify)
            if not lora_only:
                format_result(result.merge, typer.echo)
            format_ollama_result(result, typer.echo)
            return
        if lora_only:
            if not gguf:
                raise ValueError("--lora-only writes llama.cpp's LoRA adapter GGUF: add --gguf (and an --out "
                                 "ending in .gguf), or --ollama.")
            from tailor.export.gguf_lora import export_lora_gguf, format_lora_result

            format_lora_result(export_lora_gguf(adapter, out, model=model, quant=quant, force=force,
                                                store=store), typer.echo)
            return
        result = merge_adapter(adapter, out, model=model, dtype=dtype, base_dtype=base_dtype,
                               quantized=quantized, force=force, gguf=gguf, quant=quant, store=store,
                               verify=verify)
    except (ValueError, OSError) as error:
        fail(error)
    format_result(result, typer.echo)


adapters_app = typer.Typer(help="The adapter store: versions, tags, lineage, rollback.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


def _store(store: str | None):
    from tailor.adapters.store import AdapterStore

    return AdapterStore(store)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@adapters_app.command("add")
def adapters_add(
    name: str = typer.Argument(..., help="adapter name (letters, digits, . _ -)"),
    directory: str = typer.Argument(..., help="a PEFT-format adapter directory (tailor's, PEFT's, a "
                                    "combination)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Import an adapter directory as the next version of NAME (NAME@1, NAME@2, ...)."""
    try:
        ref, created = _store(store).add(name, directory)
    except (ValueError, OSError) as error:
        fail(error)
    typer.echo(f"added {ref}" if created else f"identical to {ref}; nothing added")


@adapters_app.command("list")
def adapters_list(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every version: name, version, tags, base, rank, targets, size on disk, key metric."""
    import json

    try:
        rows = _store(store).rows()
    except (ValueError, OSError) as error:
        fail(error)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no adapters in {_store(store).root}; add one with `tailor adapters add NAME DIR`")
        return
    header = ("ref", "tags", "base", "rank", "targets", "size", "metric")
    table = [header] + [(
        r["ref"], ",".join(r["tags"]) or "-", str(r["base"] or "-"), str(r["rank"]), r["targets"],
        _size(r["size_bytes"]), f"{r['metric'][0]}={r['metric'][1]:.4g}" if r["metric"] else "-",
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@adapters_app.command("show")
def adapters_show(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@TAG"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """The whole record of one version (store record, adapter config, tailor metadata) and its lineage."""
    import json

    try:
        target = _store(store)
        info, lineage = target.info(ref), target.lineage(ref)
    except (ValueError, OSError) as error:
        fail(error)
    typer.echo(json.dumps(info, indent=2, default=str))
    typer.echo("lineage:")
    for line in lineage:
        typer.echo(f"  {line}")


@adapters_app.command("diff")
def adapters_diff(
    a: str = typer.Argument(..., help="first adapter (NAME@VERSION / NAME@TAG)"),
    b: str = typer.Argument(..., help="second adapter"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """How two adapters' configs, training, data, base and metrics differ."""
    try:
        differences = _store(store).diff(a, b)
    except (ValueError, OSError) as error:
        fail(error)
    if not differences:
        typer.echo("identical: same weights, config, training, data, base and metrics")
        return
    width = max(len(key) for key, _, _ in differences)
    typer.echo(f"{'field'.ljust(width)}  {a}  |  {b}")
    for key, left, right in differences:
        typer.echo(f"{key.ljust(width)}  {left!s}  |  {right!s}")


@adapters_app.command("rm")
def adapters_rm(
    ref: str = typer.Argument(..., help="NAME@VERSION (one version) or NAME (all versions)"),
    force: bool = typer.Option(False, "--force", help="also when a tag points at it (the tag goes too)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Delete a version; refused while a tag points at it, unless --force."""
    try:
        removed = _store(store).remove(ref, force=force)
    except (ValueError, OSError) as error:
        fail(error)
    typer.echo(f"removed {', '.join(removed)}")


@adapters_app.command("tag")
def adapters_tag(
    tag: str = typer.Argument(..., help="NAME@TAG, e.g. support@prod"),
    version: str = typer.Argument(..., help="the version it points at: 3, support@3, or another tag"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Point a tag at a version (atomic; the previous one is kept for rollback)."""
    try:
        previous, current = _store(store).tag(tag, version)
    except (ValueError, OSError) as error:
        fail(error)
    name = tag.partition("@")[0]
    moved = f" (was {name}@{previous})" if previous not in (None, current) else ""
    typer.echo(f"{tag} -> {name}@{current}{moved}")


@adapters_app.command("rollback")
def adapters_rollback(
    tag: str = typer.Argument(..., help="NAME@TAG to move back to the version it pointed at before"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Move a tag back to its previous version (atomic, milliseconds)."""
    try:
        current, previous = _store(store).rollback(tag)
    except (ValueError, OSError) as error:
        fail(error)
    name = tag.partition("@")[0]
    typer.echo(f"{tag} -> {name}@{previous} (was {name}@{current})")


@adapters_app.command("describe")
def adapters_describe(
    name: str = typer.Argument(..., help="the adapter: a store reference (NAME, NAME@VERSION, NAME@TAG) or "
                               "an adapter directory"),
    examples: str = typer.Option(..., "--examples", help="what the adapter was trained on: any data file "
                                 "tailor reads (JSONL, JSON, CSV, parquet, ...) or builtin:NAME[:SPLIT]"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP + " (default: the adapter's base)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Describe what an adapter was trained on, for `model: "auto"` in `tailor serve`: centroids of the base
    model's embeddings of a sample of the prompts, written into its tailor_metadata.json ("routing").
    `tailor train` describes the adapters it trains; this is for adapters from elsewhere."""
    try:
        directory, count = describe_adapter(name, examples, model, store, force)
    except (ValueError, OSError) as error:
        fail(error)
    typer.echo(f"described {name} from {count} prompts of {examples}: {directory}")


def describe_adapter(name: str, examples: str, model: str | None = None, store: str | None = None,
                     force: bool = False) -> tuple[Path, int]:
    """(the adapter directory, the prompts described): every input checked before the model loads."""
    from tailor.adapters.format import read_adapter_config
    from tailor.adapters.metadata import check_base, read_metadata, update_metadata
    from tailor.adapters.store import locate
    from tailor.data import load_examples
    from tailor.models import DEFAULT_MODEL, load_model
    from tailor.routing import RoutingDescriptionError, describe_prompts, example_prompts
    from tailor.routing.describe import MIN_PROMPTS, SAMPLE_PROMPTS

    directory, _ = locate(name, store)
    if not directory.is_dir():
        raise ValueError(f"adapter {name!r}: no such directory or store reference; give an adapter directory "
                         "or NAME[@VERSION|@TAG] of the store (tailor adapters list).")
    read_adapter_config(directory)  # a PEFT adapter at all (names the file otherwise)
    metadata = read_metadata(directory)
    prompts = example_prompts(load_examples(examples))  # a bad record is named by file and line
    if len(prompts) < MIN_PROMPTS:
        raise RoutingDescriptionError(
            f"{examples}: {len(prompts)} prompts (records with a user turn before an assistant turn); at "
            f"least {MIN_PROMPTS} are needed (best {SAMPLE_PROMPTS}): give the chat, alpaca or "
            "prompt/completion records the adapter was trained on.")
    base_name = model or ((metadata or {}).get("base") or {}).get("name") or DEFAULT_MODEL
    base, tokenizer = load_model(base_name)
    check_base(base, metadata, str(directory), force=force)
    description = describe_prompts(base, tokenizer, prompts)
    update_metadata(directory, routing=description)  # atomically: the old file stays whole until replaced
    return directory, description["prompts"]
