"""llama.cpp itself, through llama-cpp-python, as the reference for tailor's GGUF files.

llama-cpp-python is built from its PyPI source distribution the first time a test needs it (CPU only, this
machine's instruction set, without the multimodal library) and installed into the test's environment, so
later runs import it at once (pip also keeps the built wheel in its cache, so a new environment reuses
it). Measured on this session's 2-core machine while other jobs ran on it (load 5-9): 1221 s with the
multimodal library, 1659 s without it (CMAKE_ARGS below) under heavier load: about 20-28 minutes here.
Without cmake or a C/C++ compiler, or without the package index, the tests that need it skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF "
              "-DLLAVA_BUILD=OFF")
GGML_TYPE_F32 = 0  # ggml's type id: a float32 KV cache, so llama.cpp computes in float32 throughout


def llama_cpp_module():
    """The llama_cpp module, built and installed on first use; pytest.skip (with the reason) if it cannot."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"llama.cpp checks need {LLAMA_CPP_PYTHON}, built from source here, but "
                    f"{', '.join(missing)} is not on PATH (install cmake and a C/C++ compiler)")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    start = time.monotonic()
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-binary", "llama-cpp-python",
               LLAMA_CPP_PYTHON]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not build {LLAMA_CPP_PYTHON} from source: {done.stderr.strip()[-500:]}")
    print(f"built {LLAMA_CPP_PYTHON} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    import llama_cpp

    return llama_cpp


def llama_cpp_greedy(model: Path, prompts: Sequence[Sequence[int]], new_tokens: int, stops: set[int],
                     lora: Path | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """llama.cpp's greedy continuation of each prompt (argmax of its logits, up to `new_tokens`, ending at a
    stop token, which is left out) and its logits over each prompt, from `model` (+ the `lora` adapter)."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256,
                          logits_all=True, n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                          verbose=False, seed=0)
    outputs, prompt_logits = [], []
    try:
        for prompt in prompts:
            llm.reset()
            llm.eval(list(prompt))
            prompt_logits.append(np.array(llm.scores[:len(prompt)], dtype=np.float64))
            tokens: list[int] = []
            while len(tokens) < new_tokens:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if token in stops:
                    break
                tokens.append(token)
                llm.eval([token])
            outputs.append(tokens)
    finally:
        llm.close()
    return outputs, prompt_logits
