"""tailor ui: the page's JSON API on a real uvicorn server over a tiny model, an adapter store and run
directories on disk; then the page itself in a real headless Chromium (Debian's, driven by playwright)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, serving, tiny_model_dir
from transformers import AutoModelForCausalLM

import tailor.ui as ui_package
from tailor.adapters.format import save_adapter
from tailor.adapters.store import AdapterStore
from tailor.compare.runner import decide
from tailor.lora import LoraConfig, add_lora, lora_layers
from tailor.serve.server import build_server
from tailor.ui import add_ui

ADMIN_KEY = "admin-ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
# Two runs of one comparison: lora is 0.01 below full in exact match and costs half: the decision is lora.
RUNS = {"cmp/lora/run": {"method": "lora", "seconds": 36.0, "exact_match": 0.60, "val": 1.5},
        "full": {"method": "full", "seconds": 72.0, "exact_match": 0.61, "val": 1.4}}


def write_run(directory: Path, method: str, seconds: float, exact_match: float, val: float) -> None:
    """The files `tailor train` and `tailor eval` write, with known values."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"method": method, "model": "tiny", "rank": 4,
                                                           "lr": 0.005, "max_steps": 12}))
    points = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 13)]
    for point in points[5::6]:  # validation at steps 6 and 12
        point["val_loss"] = val + (12 - point["step"]) * 0.05
    (directory / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    summary = {"method": method, "model": "tiny", "steps": 12, "train_seconds": seconds,
               "tokens_per_s": 100.0, "tokens": 3600, "trainable_params": 1000, "weights_bytes": 40960,
               "peak_rss_mib": 300.0, "frozen_weight_bytes": 2_000_000, "final_train_loss": 1.8,
               "final_val_loss": val}
    (directory / "summary.json").write_text(json.dumps(summary))
    side = {"n": 5, "exact_match": 0.2, "val_loss": 2.0, "retention_accuracy": 1.0}
    evaluation = {"n": 5, "base": side, "tuned": {**side, "exact_match": exact_match, "val_loss": val},
                  "retention": {"base": {"accuracy": 1.0}, "tuned": {"accuracy": 0.9}}, "samples": []}
    (directory / "eval.json").write_text(json.dumps(evaluation))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A tiny model, a store holding adapter `support` in two versions, two runs and a symlink out of the
    runs directory; `tailor ui`'s app on a free loopback port."""
    base = tmp_path_factory.mktemp("ui")
    model_dir = tiny_model_dir(base / "model")
    store = AdapterStore(base / "store")
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
        save_adapter(model, base / f"adapter-{seed}")
        store.add("support", base / f"adapter-{seed}")
    runs = base / "runs"
    for name, run in RUNS.items():
        write_run(runs / name, run["method"], run["seconds"], run["exact_match"], run["val"])
    write_run(base / "secret", "lora", 1.0, 1.0, 0.1)
    (runs / "escape").symlink_to(base / "secret", target_is_directory=True)

    torch.set_num_threads(1)
    app = build_server(str(model_dir), str(store.root), max_loras=2, max_lora_rank=8, max_batch=4,
                       dtype="float32", admin_key=ADMIN_KEY, max_tokens=64, timeout=60)
    add_ui(app, runs, store.root)
    with serving(app) as url:
        yield {"url": url, "store": store, "model": str(model_dir), "runs": runs}


def call(ui, path: str, body: object = None, key: str | None = None, raw: bytes | None = None):
    """(status, JSON answer) of one request to the server."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(ui["url"] + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def cli_plan(*flags: str) -> dict:
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, ["plan", "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- the API ------------------------------------------------------------------------------------------
def test_runs_are_listed_and_read_from_their_files(ui):
    status, listing = call(ui, "/api/runs")
    assert status == 200
    assert [r["name"] for r in listing["runs"]] == ["cmp/lora/run", "full"]  # not the symlink out
    lora = listing["runs"][0]
    assert (lora["method"], lora["steps"], lora["final_val_loss"], lora["quality"]) == ("lora", 12, 1.5, 0.6)
    status, run = call(ui, "/api/runs/cmp/lora/run")
    assert status == 200
    written = [json.loads(x) for x in (ui["runs"] / "cmp/lora/run/metrics.jsonl").read_text().splitlines()]
    assert run["points"] == [{"step": p["step"], "loss": p["loss"], "val_loss": p.get("val_loss")}
                             for p in written]
    assert run["config"]["rank"] == 4 and run["eval"]["tuned"]["exact_match"] == 0.6 and run["problems"] == []


def test_compare_rows_and_decision_are_the_compare_reports(ui):
    status, result = call(ui, "/api/compare?run=cmp/lora/run&run=full")
    assert status == 200
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["cmp/lora/run"]["cost_usd"] == 0.01 and rows["full"]["cost_usd"] == 0.02  # 36 s, 72 s at $1/h
    assert rows["full"]["retention"] == 0.9 and rows["full"]["peak_rss_bytes"] == 300 * 2**20
    assert result["decision"] == decide(result["methods"], 0.02)
    assert result["decision"]["method"] == "cmp/lora/run" and result["decision"]["best_method"] == "full"
    assert [c["key"] for c in result["columns"]][:3] == ["method", "field_accuracy", "exact_match"]


@pytest.mark.parametrize("path", ["/api/runs/../secret", "/api/runs/%2e%2e/secret", "/api/runs/escape",
                                  "/api/runs/%2Fetc%2Fpasswd", "/api/compare?run=full&run=../secret"])
def test_runs_outside_the_runs_directory_are_not_found(ui, path):
    status, answer = call(ui, path)
    assert status == 404 and answer["error"]["code"] == "run_not_found", answer


@pytest.mark.parametrize("path", ["/ui/static/../app.py", "/ui/static/%2e%2e/app.py",
                                  "/ui/static/%2e%2e%2f%2e%2e%2fserve%2fserver.py"])
def test_static_files_stay_in_their_folder(ui, path):
    status, answer = call(ui, path)
    assert status == 404 and answer["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("path", "body", "key", "status", "param", "words"), [
    ("/api/compare?run=full", None, None, 400, "run", "two or more runs"),
    ("/api/adapters/tag", {"tag": "support@prod", "version": 1}, None, 401, None, "admin key"),
    ("/api/adapters/tag", {"tag": "../../x@prod", "version": 1}, ADMIN_KEY, 400, "tag", "not allowed"),
    ("/api/adapters/tag", {"tag": "nobody@prod", "version": 1}, ADMIN_KEY, 404, "tag", "No adapter 'nobody'"),
    ("/api/adapters/tag", {"tag": "support@prod", "version": 9}, ADMIN_KEY, 400, "tag", "no version 9"),
    ("/api/adapters/tag", {"tag": "support", "version": 1}, ADMIN_KEY, 400, "tag", "names no tag"),
    ("/api/adapters/rollback", {"tag": "support@nothing"}, ADMIN_KEY, 400, "tag", "no tag 'nothing'"),
    ("/api/adapters/rollback", {"tag": "support@a", "path": "/etc"}, ADMIN_KEY, 400, "path", "Unrecognized"),
    ("/api/plan", {"model": "/etc/passwd"}, None, 400, "model", "catalogue"),
    ("/api/plan", {"model": "../model/config.json"}, None, 400, "model", "catalogue"),
    ("/api/plan", {"rank": 0}, None, 400, "rank", "greater than or equal to 1"),
    ("/api/plan", {"method": "magic"}, None, 400, None, "magic"),
    ("/api/plan", [1, 2], None, 400, None, "JSON object"),
])
def test_bad_input_gets_a_clear_error(ui, path, body, key, status, param, words):
    got, answer = call(ui, path, body, key)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_bad_json_is_a_400(ui):
    status, answer = call(ui, "/api/plan", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


def test_plan_is_tailor_plans(ui):
    inputs = {"model": "SmolLM2-360M", "method": "qlora-nf4", "rank": 8, "batch_size": 2, "max_seq_len": 512,
              "grad_accum": 2, "tokens": 2e6}
    status, plan = call(ui, "/api/plan", inputs)
    assert status == 200
    expected = cli_plan("--model", "SmolLM2-360M", "--method", "qlora-nf4", "--rank", "8", "--batch-size",
                        "2", "--max-seq-len", "512", "--grad-accum", "2", "--tokens", "2e6")
    assert {k: v for k, v in plan.items() if k != "tokens_basis"} == \
        {k: v for k, v in expected.items() if k != "tokens_basis"}


def answer(ui, model: str, prompt: str = "add 2 3", max_tokens: int = 12) -> str:
    """What the server answers (greedy, not streamed)."""
    status, body = call(ui, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "top_p": 1,
        "max_tokens": max_tokens})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_tag_and_rollback_move_the_stores_tags_and_what_the_tag_serves(ui):
    store = ui["store"]
    first, second = answer(ui, "support@1"), answer(ui, "support@2")
    assert first != second
    status, moved = call(ui, "/api/adapters/tag", {"tag": "support@canary", "version": 1}, ADMIN_KEY)
    assert (status, moved["previous"], moved["version"]) == (200, None, 1)
    assert call(ui, "/api/adapters/tag", {"tag": "support@canary", "version": "2"}, ADMIN_KEY)[1] == \
        {"tag": "support@canary", "previous": 1, "version": 2}
    assert store.tags("support")["canary"]["version"] == 2
    assert answer(ui, "support@canary") == second
    assert call(ui, "/api/adapters/rollback", {"tag": "support@canary"}, ADMIN_KEY)[1]["version"] == 1
    assert answer(ui, "support@canary") == first  # the rollback is served at once
    assert store.tags("support")["canary"] == {**store.tags("support")["canary"], "version": 1, "history": []}
    status, listing = call(ui, "/api/adapters")
    versions = listing["adapters"][0]["versions"]
    assert [v["ref"] for v in versions] == ["support@1", "support@2"]
    assert versions[0]["tags"] == ["canary"] and versions[0]["lineage"] == store.lineage("support@1")


def test_a_damaged_run_is_shown_with_its_problem_and_linked_files_stay_unread(tmp_path):
    from tailor.ui import RunIndex

    write_run(tmp_path / "runs" / "a" / "b" / "c", "lora", 1.0, 0.5, 1.0)  # three levels down: found
    write_run(tmp_path / "runs" / "a" / "b" / "c" / "d" / "nested", "lora", 1.0, 0.5, 1.0)  # inside a run
    (tmp_path / "runs" / "a" / "b" / "c" / "eval.json").write_text("{cut off")
    (tmp_path / "outside.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    metrics = tmp_path / "runs" / "a" / "b" / "c" / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(tmp_path / "outside.jsonl")
    index = RunIndex(tmp_path / "runs")
    assert list(index.names()) == ["a/b/c"]
    run = index.run("a/b/c")
    assert run["points"] == [] and run["eval"] is None and run["config"]["method"] == "lora"
    [problem] = run["problems"]
    assert problem.startswith("eval.json is unreadable (JSONDecodeError")


# --- the page in a real browser -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (make test does) to run the "
                    "browser tests")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="tailor-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, ui):
    page = browser.new_page()
    page.add_init_script("localStorage.clear()")  # each test starts without a key typed in before
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(20_000)
    yield page
    page.close()
    assert errors == [], errors  # no script errors on any page


def test_runs_page_shows_a_run_and_compares_two(page, ui):
    page.goto(ui["url"] + "/")  # redirects to /ui
    page.wait_for_selector("#runs-table tbody tr[data-run='full']")
    assert page.locator("#runs-table tbody tr").count() == 2
    page.click("text=cmp/lora/run")
    curve = page.locator("#loss-curve polyline[data-label='train loss']")
    assert curve.get_attribute("data-points") == "12"
    assert page.locator("#loss-curve polyline[data-label='val loss']").get_attribute("data-points") == "2"
    assert page.locator("#eval-table tbody tr").first.inner_text().split("\t") == \
        ["exact match", "0.200", "0.600", "+0.400"]
    page.check("input[value='cmp/lora/run']")
    page.check("input[value='full']")
    page.click("#compare-button")
    page.wait_for_selector("#compare-table")
    assert "cmp/lora/run reaches 0.600, within 0.02 of the best (full, 0.610)" in page.inner_text("#decision")
    points = page.locator("#quality-cost circle.point")
    assert {(points.nth(i).get_attribute("data-label"), points.nth(i).get_attribute("data-y"))
            for i in range(2)} == {("cmp/lora/run", "0.6"), ("full", "0.61")}
    page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)


def test_adapters_page_tags_and_rolls_back(page, ui):
    store = ui["store"]
    page.goto(ui["url"] + "/ui#adapters")
    page.wait_for_selector("[data-adapter='support']")
    page.fill("#key", ADMIN_KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("[data-adapter='support']")
    for version in ("1", "2"):
        page.fill("input[aria-label='tag of support']", "prod")
        page.select_option("select[aria-label='version for support']", version)
        page.click("[data-set-tag='support']")
        page.wait_for_selector(f"#adapters-message:has-text('support@prod → version {version}')")
        assert store.tags("support")["prod"]["version"] == int(version)
    page.wait_for_selector("[data-rollback='support@prod']:not([disabled])")
    page.click("[data-rollback='support@prod']")
    page.wait_for_selector("#adapters-message:has-text('support@prod → version 1 (was 2)')")
    assert store.tags("support")["prod"]["version"] == 1
    page.screenshot(path=str(ARTIFACTS / "adapters.png"), full_page=True)
    page.fill("#key", "wrong")  # a wrong key gets the API's error, shown as it is
    page.dispatch_event("#key", "change")
    page.click("[data-set-tag='support']")
    page.wait_for_selector("#adapters-message.error:has-text('401 authentication_error')")


def test_playground_streams_base_and_adapter_side_by_side(page, ui):
    page.goto(ui["url"] + "/ui#playground")
    page.wait_for_selector(f"#play-models input[value='{ui['model']}']:checked")
    page.check("#play-models input[value='support@2']")
    page.fill("#play-prompt", "add 2 3")
    page.fill("#play-max-tokens", "12")
    page.click("#play-run")
    page.wait_for_selector(".answer.done >> nth=1")
    shown = {a.get_attribute("data-model"): a.locator("pre").inner_text()
             for a in page.locator(".answer").all()}
    for model in (ui["model"], "support@2"):  # what the API answers without streaming
        assert shown[model] == answer(ui, model), model
    assert shown[ui["model"]] != shown["support@2"]
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_planner_form_shows_tailor_plans_figures(page, ui):
    page.goto(ui["url"] + "/ui#planner")
    page.wait_for_selector("#memory-bar rect.part")
    page.fill("#plan-form input[name='model']", "SmolLM2-360M")
    page.select_option("#plan-form select[name='method']", "qlora-nf4")
    page.fill("#plan-form input[name='rank']", "8")
    page.fill("#plan-form input[name='batch_size']", "2")
    page.fill("#plan-form input[name='max_seq_len']", "512")
    page.click("#plan-run")
    page.wait_for_selector("h3:has-text('SmolLM2-360M, qlora-nf4')")
    expected = cli_plan("--model", "SmolLM2-360M", "--method", "qlora-nf4", "--rank", "8", "--batch-size",
                        "2", "--max-seq-len", "512")
    memory = expected["memory_gib"]
    assert page.inner_text("#plan-total") == f"{memory['total']:.2f} GiB"
    parts = page.locator("#memory-bar rect.part")
    shown = {parts.nth(i).get_attribute("data-part"): float(parts.nth(i).get_attribute("data-value"))
             for i in range(parts.count())}
    assert shown == {k: v for k, v in memory.items() if k != "total"}
    chosen = expected["chosen_gpu"]
    gpu = f"{chosen['gpus_needed']} × {chosen['gpu']}, ${chosen['cost_usd']:.2f}"
    assert page.inner_text("#plan-gpu") == gpu
    assert page.locator("#gpu-table tbody tr").count() == len(expected["gpus"])
    page.screenshot(path=str(ARTIFACTS / "planner.png"), full_page=True)
    page.fill("#plan-form input[name='rank']", "-1")  # the API's error, on the page
    page.click("#plan-run")
    page.wait_for_selector("#plan-error:has-text(\"400 invalid_request_error: Invalid value for 'rank'\")")


def test_tailor_ui_command(ui):
    """The command as users run it: a subprocess serving the page, its API and /v1 together."""
    port = free_port()
    command = [sys.executable, "-m", "tailor.cli", "ui", "--runs", str(ui["runs"]), "--adapters",
               str(ui["store"].root), "--model", ui["model"], "--port", str(port), "--dtype", "float32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        with urllib.request.urlopen(url + "/", timeout=10) as page:  # redirected to /ui
            assert page.url == url + "/ui" and b"/ui/static/app.js" in page.read()
        with urllib.request.urlopen(url + "/ui/static/app.js", timeout=10) as script:
            assert script.read() == (Path(ui_package.__file__).parent / "static" / "app.js").read_bytes()
        assert [r["name"] for r in call({"url": url}, "/api/runs")[1]["runs"]] == ["cmp/lora/run", "full"]
        assert "support@1" in {m["id"] for m in call({"url": url}, "/v1/models")[1]["data"]}
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"tailor ui: http://127.0.0.1:{port}/ui" in output


def test_ui_command_refuses_a_missing_runs_directory(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, ["ui", "--runs", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "runs directory" in result.output and "does not exist" in result.output

