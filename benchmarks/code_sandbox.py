"""Scoring the code task: the sandbox's batched scorer (one subprocess, a forked child per answer, as many
at a time as there are cores) against a baseline of one fresh `python -I` interpreter per answer, on the
same answers (the reference answers of builtin:code:test, so every one passes).

    python benchmarks/code_sandbox.py --n 200 --json sandbox.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import print_machine  # noqa: E402

# the baseline's program: one answer's job on stdin, its outcome on stdout (no fork, no audit hook)
_ONE = ("import json, sys\njob = json.load(sys.stdin)\nnamespace = {}\nexec(job['source'], namespace)\n"
        "f = namespace[job['function']]\n"
        "print('passed' if all(f(*a) == e for a, e in job['tests']) else 'failed')")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="answers to score (the first N of the test split)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from tailor.data.tasks import code
    from tailor.data.tasks.sandbox import run_answers

    args = parse_args(argv)
    machine = print_machine("cpu")
    examples = code.build("test", n=args.n)
    jobs = []
    for example in examples:
        name, tests = code.hidden_tests(example.prompt[-1]["content"])
        jobs.append({"source": example.reference, "function": name, "tests": tests})

    started = time.perf_counter()
    outcomes = run_answers(jobs, code.TIME_LIMIT_S)
    sandbox_s = time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = [subprocess.run([sys.executable, "-I", "-c", _ONE], input=json.dumps(job), text=True,
                                   capture_output=True, cwd=scratch, timeout=30).stdout.strip()
                    for job in jobs]
    baseline_s = time.perf_counter() - started
    assert outcomes == baseline == ["passed"] * len(jobs), "the reference answers must all pass"
    result = {"machine": machine, "n": len(jobs), "sandbox_seconds": round(sandbox_s, 3),
              "one_interpreter_per_answer_seconds": round(baseline_s, 3),
              "speedup": round(baseline_s / sandbox_s, 2)}
    print(f"{len(jobs)} answers: sandbox {sandbox_s:.2f} s, one interpreter per answer {baseline_s:.2f} s "
          f"({result['speedup']}x)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
