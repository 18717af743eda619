"""The web app as a user meets it: `streamq app` started as a command, against the local Hub emulator,
driven through `gradio_client` (the `/requantize` API) and through its page in headless Chromium.

Needs the `app` extra and Debian's chromium + chromium-driver (`.ci/run` installs both); missing, the
tests fail rather than skip, so CI never passes without them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from huggingface_hub import HfApi, snapshot_download

from gguf_cases import make_checkpoint
from streamq import stream_requantize
from streamq.testing import Fault, LocalHub
from tiny_models import make_model

SENTINEL = "hf_SENTINELappToken0123456789abcdefXYZ"  # the app's HF_TOKEN: must never show up anywhere
VISITOR = "hf_VISITORscriptToken9876543210zyxwvuTSR"  # a script's own token (gradio_client's oauth_token=)
# A screenshot of the finished page is saved where STREAMQ_SCREENSHOT says (the README's is made so:
# STREAMQ_SCREENSHOT=benchmarks/results/app_finished.png); a test run leaves tracked files alone.
SCREENSHOT = os.environ.get("STREAMQ_SCREENSHOT")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1200,1400"
).split()


class App:
    """A running `streamq app` subprocess and the Hub it talks to."""

    def __init__(self, hub: LocalHub, url: str, log: Path) -> None:
        self.hub, self.url, self.log = hub, url, log
        self.api = HfApi(endpoint=hub.endpoint, token=SENTINEL)
        self.seen: list[str] = []  # everything the page and the API showed, checked for the token at the end

    def repos(self) -> dict[str, str]:
        """Every repo of the emulator and its main commit: what a failed run must leave as it was."""
        found = {}
        for repo_id in ("me/model-nf4", "me/model-int4", "me/page-nf4", "me/exists", "me/new", "org/out", "me/missing-nf4", "me/private-nf4", "me/gated-nf4"):
            if self.api.repo_exists(repo_id):
                found[repo_id] = self.api.model_info(repo_id).sha
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("app")
    tokens = {
        SENTINEL: {"user": "me", "write": ["me/*"], "read": ["org/*"]},
        VISITOR: {"user": "you", "write": ["you/*"], "read": ["org/*"]},
        "hf_owner": {"user": "org", "write": ["*"]},
    }
    with LocalHub(root / "hub", tokens=tokens) as hub:
        owner = HfApi(endpoint=hub.endpoint, token="hf_owner")
        for name, seed in (("org/model", 0), ("org/page", 1), ("other/private", 2), ("org/gated", 3)):
            owner.create_repo(name, private=name == "other/private")
            owner.upload_folder(repo_id=name, folder_path=make_model(root / name.replace("/", "_"), seed=seed))
        hub.set_gated("org/gated")
        # a tiny Llama with a tokenizer llama.cpp's converter takes, for GGUF (org/model has no tokenizer)
        owner.create_repo("org/tiny-llama")
        owner.upload_folder(repo_id="org/tiny-llama", folder_path=make_checkpoint(root / "tiny-llama", "llama"))
        # an output made earlier with other settings (fp4): converting into it with nf4 must be refused
        stream_requantize("org/model", "me/exists", quant_type="fp4", endpoint=hub.endpoint, token=SENTINEL, progress=False)

        port = _free_port()
        env = {**os.environ, "HF_TOKEN": SENTINEL, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "STREAMQ_WORK_DIR": str(root / "work"), "HF_HOME": str(root / "hf_home")}
        env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the app itself must turn analytics off
        log = root / "app.log"
        with open(log, "wb") as out:
            command = [sys.executable, "-m", "streamq", "-vv", "app", "--port", str(port), "--endpoint", hub.endpoint]
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_until_up(url, proc, log)
            yield App(hub, url, log)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamq app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"streamq app did not answer within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_importing_streamq_does_not_import_gradio() -> None:
    code = (
        "import sys, streamq, streamq.cli; streamq.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client', 'selenium') or m.startswith('streamq.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gradio_client_converts_and_the_output_loads(app: App, tmp_path: Path) -> None:
    from gradio_client import Client
    from transformers import AutoModelForCausalLM

    import torch

    client = Client(app.url, verbose=False, analytics_enabled=False)
    assert "/requantize" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    plan = client.predict("org/model", "nf4", True, "bfloat16", api_name="/plan")
    assert "model-00001-of-00007.safetensors" in plan and "disk budget on this machine" in plan
    progress, link, result = client.predict("org/model", "me/model-nf4", "nf4", True, "bfloat16", False, api_name="/requantize")
    app.seen += [plan, progress, link, json.dumps(result)]
    assert result["url"] == f"{app.hub.endpoint}/me/model-nf4" and result["url"] in link
    assert result["shards"] == 1 and result["shards_skipped"] == 0 and result["tensors_quantized"] > 0  # 1 GB shards
    assert "Phase:** done" in progress and "1 of 1 published" in progress
    assert f"**Elapsed:** {result['elapsed']:.1f} s" in progress  # the page's time is the result's

    out = Path(snapshot_download("me/model-nf4", endpoint=app.hub.endpoint, token=SENTINEL, local_dir=tmp_path / "dl"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    direct = tmp_path / "direct"  # the library itself, same source and options: the page passes them as given
    stream_requantize("org/model", direct, endpoint=app.hub.endpoint, token=SENTINEL, progress=False)
    shards = sorted(p.name for p in direct.glob("*.safetensors"))
    assert shards == ["model.safetensors"] and all((out / name).read_bytes() == (direct / name).read_bytes() for name in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # the same conversion again resumes: every shard is found done, nothing is converted or committed
    commits = len(app.api.list_repo_commits("me/model-nf4"))
    progress, _, again = client.predict("org/model", "me/model-nf4", "nf4", True, "bfloat16", False, api_name="/requantize")
    assert again["shards_skipped"] == 1 and "1 done by an earlier run" in progress
    assert len(app.api.list_repo_commits("me/model-nf4")) == commits


def test_int4_with_the_group_size_asked_for(app: App, tmp_path: Path) -> None:
    """The page's int4 takes its group size (the tiny model's 64- and 96-wide layers need 32, not the default 128)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app.url, verbose=False, analytics_enabled=False)
    with pytest.raises(AppError, match="not a multiple of the int4 group size 128"):
        client.predict("org/model", "int4", True, "bfloat16", 128, api_name="/plan")
    _, link, result = client.predict("org/model", "me/model-int4", "int4", True, "bfloat16", False, 32, api_name="/requantize")
    assert result["url"] in link and result["stats"]["groups"] > 0
    out = Path(snapshot_download("me/model-int4", endpoint=app.hub.endpoint, token=SENTINEL, local_dir=tmp_path / "dl"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"]["config_group_0"]["weights"]["group_size"] == 32


def test_a_script_converts_with_its_own_token(app: App) -> None:
    from gradio_client import Client

    client = Client(app.url, verbose=False, analytics_enabled=False, oauth_token=VISITOR)
    progress, link, result = client.predict("org/page", "", "nf4", True, "bfloat16", False, api_name="/requantize")
    app.seen += [progress, link, json.dumps(result)]
    assert result["url"] == f"{app.hub.endpoint}/you/page-nf4"  # the default name is the token's user's
    assert HfApi(endpoint=app.hub.endpoint, token=VISITOR).file_exists("you/page-nf4", "config.json")


def test_the_api_example_the_page_shows_runs_as_shown(app: App) -> None:
    """The call in the page's footer is the README's, and it converts when run against the page: only the
    page's address and the token are filled in (a script's own token, as a Space needs)."""
    with urllib.request.urlopen(app.url + "config", timeout=10) as response:
        components = json.loads(response.read())["components"]
    shown = next(c["props"]["value"] for c in components if c.get("props", {}).get("elem_id") == "api-example")
    code = shown.removeprefix("```python\n").removesuffix("\n```")
    assert code != shown and code in (Path(__file__).parents[1] / "README.md").read_text()
    for placeholder, value in (('"http://127.0.0.1:7860/"', repr(app.url)), ('"hf_..."', repr(VISITOR))):
        assert code.count(placeholder) == 1, placeholder
        code = code.replace(placeholder, value)
    names: dict[str, object] = {}
    exec(code, names)
    progress, link, result = names["progress"], names["link"], names["result"]
    app.seen += [progress, link, json.dumps(result)]
    assert result["url"] == f"{app.hub.endpoint}/you/model-nf4" and result["shards_skipped"] == 0 and "Done" in link
    assert HfApi(endpoint=app.hub.endpoint, token=VISITOR).file_exists("you/model-nf4", "config.json")


def test_the_page_in_a_browser_plans_converts_shows_progress_and_links(app: App, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    slow = app.hub.faults.add(Fault.throttle(2048, 0.02, method="GET", path=r"^/storage/", times=None))  # ~100 kB/s: progress is seen
    try:
        browser.get(app.url)
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        source = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#source textarea, #source input"))
        output = browser.find_element(By.CSS_SELECTOR, "#output textarea, #output input")
        source.send_keys("org/page")
        output.click()  # leaving the source field suggests <user>/<model>-<quant type>
        wait.until(lambda d: output.get_attribute("value") == "me/page-nf4")

        browser.find_element(By.ID, "plan").click()
        wait.until(lambda d: "disk budget on this machine" in d.find_element(By.ID, "plan-box").text)
        plan = browser.find_element(By.ID, "plan-box").text
        assert "model-00007-of-00007.safetensors" in plan and "quantize: nn.Linear replaced by Linear4bit" in plan

        browser.find_element(By.ID, "convert").click()
        seen: list[str] = []

        def finished(driver) -> bool:
            seen.append(driver.find_element(By.ID, "status").text)
            return "Done:" in driver.find_element(By.ID, "result").text

        wait.until(finished)
    finally:
        app.hub.faults.remove(slow)
    during = [text for text in seen if "Phase: shard" in text]
    assert during, f"no progress seen while converting: {seen[-3:]}"
    assert any("Input converted:" in t and "MB/s" in t and "Work directory:" in t for t in during)
    link = browser.find_element(By.CSS_SELECTOR, "#result a")
    assert link.get_attribute("href") == f"{app.hub.endpoint}/me/page-nf4"
    assert "Phase: done" in browser.find_element(By.ID, "status").text
    assert app.api.file_exists("me/page-nf4", "config.json")
    screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "app_finished.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1200, browser.execute_script("return document.documentElement.scrollHeight") + 120)  # the whole page, link included
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    app.seen += [browser.page_source, "\n".join(seen)]

    # offline: the page loaded nothing from outside this machine (no CDN, fonts or analytics)
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            hosts.add(message["params"]["request"]["url"].split("/")[2])
    assert hosts - {"", app.url.split("/")[2]} == set(), hosts


def _shown(browser, elem_id: str) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return any(e.is_displayed() for e in browser.find_elements(By.ID, elem_id))
    except StaleElementReferenceException:  # gradio re-rendered it meanwhile: asked again by the caller's wait
        return False


def _choose_quant_type(browser, name: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def click(driver) -> bool:
        driver.find_element(By.CSS_SELECTOR, f'#quant-type input[value="{name}"]').click()
        return driver.find_element(By.CSS_SELECTOR, f'#quant-type input[value="{name}"]').is_selected()

    WebDriverWait(browser, 10, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]).until(click)


def test_gguf_hides_the_bitsandbytes_only_controls(app: App, browser) -> None:
    """Double quant and compute dtype show for NF4/FP4 only, the group size for int4 only; GGUF has none of them."""
    from selenium.webdriver.support.ui import WebDriverWait

    from streamq.app.run import QUANT_TYPES

    browser.get(app.url)
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda d: _shown(d, "quant-type") and _shown(d, "double-quant"))
    gguf = [name for name in QUANT_TYPES if name.startswith("gguf-")]
    assert {"gguf-q4_k_m", "gguf-q4_0", "gguf-q8_0"} <= set(gguf)
    for name, bnb, int4 in [("int4", False, True), *((g, False, False) for g in gguf), ("fp4", True, False), ("gguf-q8_0", False, False), ("nf4", True, False)]:
        _choose_quant_type(browser, name)
        expected = {"double-quant": bnb, "compute-dtype": bnb, "group-size": int4, "private": True, "overwrite": True}
        wait.until(lambda d: {k: _shown(d, k) for k in expected} == expected, message=f"controls shown for {name}")


def test_gguf_from_the_page_plans_converts_and_links(app: App, browser, tmp_path: Path) -> None:
    """GGUF Q4_K_M chosen on the page: the default name is gguf-my-repo's, the plan is llama.cpp's files and
    types, and the finished run links to a repo holding the GGUF file and its card, which llama.cpp runs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from streamq import verify_output

    browser.get(app.url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    source = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#source textarea, #source input"))
    output = browser.find_element(By.CSS_SELECTOR, "#output textarea, #output input")
    source.send_keys("org/tiny-llama")
    output.click()
    wait.until(lambda d: output.get_attribute("value") == "me/tiny-llama-nf4")
    _choose_quant_type(browser, "gguf-q4_k_m")  # the suggested name follows the quant type
    wait.until(lambda d: output.get_attribute("value") == "me/tiny-llama-Q4_K_M-GGUF")

    browser.find_element(By.ID, "plan").click()
    wait.until(lambda d: "disk budget on this machine" in d.find_element(By.ID, "plan-box").text)
    plan = browser.find_element(By.ID, "plan-box").text
    # llama-quantize's Q4_K_M mixture for this model (tests/test_gguf.py): Q6_K for output and 2 x 2 tensors
    assert "GGUF Q4_K_M (llama): 9 F32, 25 Q4_K, 5 Q6_K" in plan and "tiny-llama-Q4_K_M.gguf" in plan

    browser.find_element(By.ID, "convert").click()
    wait.until(lambda d: "Done:" in d.find_element(By.ID, "result").text or "Error" in d.find_element(By.ID, "result").text)
    assert "Phase: done" in browser.find_element(By.ID, "status").text, browser.find_element(By.ID, "result").text
    repo = "me/tiny-llama-Q4_K_M-GGUF"
    assert browser.find_element(By.CSS_SELECTOR, "#result a").get_attribute("href") == f"{app.hub.endpoint}/{repo}"
    app.seen.append(browser.page_source)

    out = Path(snapshot_download(repo, endpoint=app.hub.endpoint, token=SENTINEL, local_dir=tmp_path / "dl"))
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == [".gitattributes", "README.md", "streamq_manifest.json", "tiny-llama-Q4_K_M.gguf"]
    gguf = (out / "tiny-llama-Q4_K_M.gguf").read_bytes()
    assert gguf[:4] == b"GGUF"
    assert f"hf.co/{repo}:Q4_K_M" in (out / "README.md").read_text()  # the card's Ollama line
    direct = tmp_path / "direct"  # the library itself, same source and type: the page passes them as given
    stream_requantize("org/tiny-llama", direct, format="gguf", quant_type="q4_k_m", endpoint=app.hub.endpoint, token=SENTINEL, progress=False)
    assert (direct / "tiny-llama-Q4_K_M.gguf").read_bytes() == gguf
    report = verify_output(repo, load=True, endpoint=app.hub.endpoint, token=SENTINEL)  # checksums, and llama.cpp runs it
    assert report.ok and report.loaded and report.checked_files == 1, report.problems


def test_gguf_through_the_api_with_the_default_name(app: App, tmp_path: Path) -> None:
    from gradio_client import Client

    client = Client(app.url, verbose=False, analytics_enabled=False, oauth_token=VISITOR)
    plan = client.predict("org/tiny-llama", "gguf-q8_0", True, "bfloat16", api_name="/plan")
    assert "GGUF Q8_0 (llama): 9 F32, 30 Q8_0" in plan and "tiny-llama-Q8_0.gguf" in plan
    # the bitsandbytes options a script passes anyway are not GGUF's: the page leaves them out, as it does for int4
    progress, link, result = client.predict("org/tiny-llama", "", "gguf-q8_0", False, "float16", False, api_name="/requantize")
    app.seen += [plan, progress, link, json.dumps(result)]
    assert result["url"] == f"{app.hub.endpoint}/you/tiny-llama-Q8_0-GGUF" and result["url"] in link
    assert result["shards"] == 1 and result["tensors_quantized"] == 30 and "1 of 1 published" in progress
    got = Path(HfApi(endpoint=app.hub.endpoint, token=VISITOR).hf_hub_download("you/tiny-llama-Q8_0-GGUF", "tiny-llama-Q8_0.gguf", local_dir=tmp_path))
    assert got.stat().st_size == result["bytes_out"] and got.read_bytes()[:4] == b"GGUF"


BAD_INPUT = [
    ("org/missing", "me/missing-nf4", "nf4", "repo org/missing not found"),
    ("other/private", "me/private-nf4", "nf4", "repo other/private not found, or private"),
    ("org/gated", "me/gated-nf4", "nf4", "org/gated is gated"),
    ("org/model", "org/out", "nf4", "cannot write to org/out"),
    ("org/model", "me/exists", "nf4", "the output already holds a run with settings"),
    ("./model", "me/new", "nf4", "must be a Hub repo id"),
]


@pytest.mark.parametrize("source, output, quant, message", BAD_INPUT, ids=[c[3] for c in BAD_INPUT])
def test_bad_input_on_the_page_shows_one_line_and_publishes_nothing(app: App, browser, source: str, output: str, quant: str, message: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = app.repos()
    browser.get(app.url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#source textarea, #source input")).send_keys(source)
    field = browser.find_element(By.CSS_SELECTOR, "#output textarea, #output input")
    field.click()
    wait.until(lambda d: field.get_attribute("value"))  # the suggested name, replaced by the one under test
    field.clear()
    field.send_keys(output)
    browser.find_element(By.ID, "convert").click()
    wait.until(lambda d: message in d.find_element(By.ID, "result").text)
    assert "Phase: failed" in browser.find_element(By.ID, "status").text
    assert len(browser.find_element(By.ID, "result").text.strip().splitlines()) == 1  # one line
    shown = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in shown and "File \"" not in shown
    app.seen.append(browser.page_source)
    assert app.repos() == before  # no new repo, no new commit
    if output == "me/exists":
        assert "fp4" in shown  # names the setting that differs


USER_ERRORS = [  # gradio's two ways of running a handler (a function; a generator) and the run's own refusal
    ("/plan", ("org/missing", "nf4", True, "bfloat16")),
    ("/plan", ("org/model", "gguf-q4_k_m", True, "bfloat16")),  # no tokenizer for llama.cpp: transformers' error is 5 lines
    ("/requantize", ("org/model", "./out", "nf4", True, "bfloat16", False)),
    ("/requantize", ("org/missing", "me/missing-nf4", "nf4", True, "bfloat16", False)),
]


@pytest.mark.parametrize("api_name, args", USER_ERRORS, ids=[f"{a}({c[0]}, {c[1]})" for a, c in USER_ERRORS])
def test_a_users_mistake_is_one_line_in_the_servers_log_not_a_traceback(app: App, api_name: str, args: tuple) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app.url, verbose=False, analytics_enabled=False)
    start = app.log.stat().st_size
    with pytest.raises(AppError) as raised:
        client.predict(*args, api_name=api_name)
    message = str(raised.value)
    with open(app.log, "rb") as log:  # gradio answers the client after it has logged the error
        log.seek(start)
        logged = log.read().decode(errors="replace")
    assert "Traceback" not in logged and "gradio.exceptions.Error" not in logged, logged
    assert [line for line in logged.splitlines() if message in line] == [f"WARNING streamq.app: {message}"], logged


def test_the_token_never_appears_in_pages_api_answers_or_logs(app: App) -> None:
    assert len(app.seen) >= 5, "run the tests above first (they collect what the page showed)"
    for path in ("config", "gradio_api/info"):
        with urllib.request.urlopen(app.url + path, timeout=10) as response:
            app.seen.append(response.read().decode())
    log = app.log.read_text(errors="replace")
    assert "Running on local URL" in log
    for text in [*app.seen, log]:
        for token in (SENTINEL, VISITOR):
            assert token not in text and token[3:] not in text


def test_one_conversion_at_a_time_the_next_waits_in_the_queue(app: App) -> None:
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(app.url, verbose=False, analytics_enabled=False)
    slow = app.hub.faults.add(Fault.throttle(2048, 0.02, method="GET", path=r"^/storage/", times=None))
    try:
        first = client.submit("org/model", "me/queue-a", "nf4", True, "bfloat16", False, api_name="/requantize")
        second = client.submit("org/model", "me/queue-b", "nf4", True, "bfloat16", False, api_name="/requantize")
        states = []
        while not (first.done() and second.done()):
            state = (first.status().code, second.status().code)
            if not states or states[-1] != state:
                states.append(state)
            time.sleep(0.05)
    finally:
        app.hub.faults.remove(slow)
    # the client hears each job's state on its own stream, so at a hand-over it may still call the finished
    # one running: what it must show is one job waiting in the queue while the other runs
    running = (Status.PROCESSING, Status.ITERATING)
    assert any(a in running and b == Status.IN_QUEUE or b in running and a == Status.IN_QUEUE for a, b in states), states
    assert first.result()[2]["shards"] == 1 and second.result()[2]["shards"] == 1
    # on the Hub: every commit of one output came before the first commit of the other
    a, b = ([c.created_at for c in app.api.list_repo_commits(repo)] for repo in ("me/queue-a", "me/queue-b"))
    assert max(a) < min(b) or max(b) < min(a), (a, b)


def _handler(page, api_name: str):
    return next(f.fn for f in page.fns.values() if f.api_name == api_name)


def test_on_a_space_the_visitors_own_token_is_used_and_login_is_required(app: App, monkeypatch, tmp_path: Path) -> None:
    import gradio as gr
    import gradio.oauth

    from streamq.app import build_app

    # what a Space with `hf_oauth: true` provides (read by gradio at import); the provider is never contacted here
    for name, value in (("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"), ("OPENID_PROVIDER_URL", "http://127.0.0.1:9")):
        monkeypatch.setattr(gradio.oauth, name, value)
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "me/streamq")
    monkeypatch.delenv("HF_TOKEN", raising=False)  # never the Space owner's token for a visitor
    page = build_app(endpoint=app.hub.endpoint, work_dir=str(tmp_path))
    assert any(isinstance(block, gr.LoginButton) for block in page.blocks.values())
    requantize = _handler(page, "requantize")
    with pytest.raises(gr.Error, match="Log in with the Hugging Face button first"):
        next(requantize("org/model", "me/space-nf4", "nf4", True, "bfloat16", False, 128, oauth_token=None, oauth_profile=None))
    token = gr.OAuthToken(token=SENTINEL, scope="openid profile read-repos write-repos manage-repos", expires_at=0)
    profile = gr.OAuthProfile({"preferred_username": "me", "name": "me", "picture": "", "profile": "", "website": ""})
    *_, (progress, link, result) = requantize("org/model", "", "fp4", False, "bfloat16", True, 128, oauth_token=token, oauth_profile=profile)
    assert result["url"].endswith("/me/model-fp4") and "Done" in link  # default output from the profile's name
    assert app.api.model_info("me/model-fp4").private
    config = json.loads(Path(app.api.hf_hub_download("me/model-fp4", "config.json", local_dir=tmp_path / "dl")).read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is False
    assert SENTINEL not in progress + link + json.dumps(result)


def test_a_run_plans_the_model_once_and_the_page_shows_the_results_elapsed(app: App, monkeypatch, tmp_path: Path) -> None:
    """The disk budget comes from the run's own plan, so the page's clock and the result time the same run."""
    import streamq.pipeline
    from streamq.app.page import render_progress
    from streamq.app.run import Conversion, RunProgress

    plans = []
    build_plan = streamq.pipeline.build_plan

    def counted(*args: Any, **kwargs: Any) -> Any:
        plans.append(args[0])
        return build_plan(*args, **kwargs)

    monkeypatch.setattr(streamq.pipeline, "build_plan", counted)
    run = RunProgress(Conversion("org/model", "me/planned-once-nf4", token=SENTINEL, endpoint=app.hub.endpoint), tmp_path).start()
    assert run.wait(120)
    snap = run.snapshot()
    assert snap.error is None and snap.result is not None and len(plans) == 1
    assert snap.disk_budget is not None  # chosen from that one plan
    assert snap.elapsed == snap.result.elapsed and f"**Elapsed:** {snap.result.elapsed:.1f} s" in render_progress(snap)


def test_a_crash_is_one_line_on_the_page_and_its_traceback_once_in_the_log(monkeypatch, tmp_path: Path, caplog) -> None:
    from streamq.app import run as app_run

    def crash(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(app_run, "iter_requantize", crash)
    run = app_run.RunProgress(app_run.Conversion("org/model", "me/crash-nf4"), tmp_path).start()
    assert run.wait(30)
    assert run.snapshot().error == "unexpected RuntimeError: the disk caught fire"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].name == "streamq.app" and logged[0].exc_info[0] is RuntimeError


def test_rules_default_output_disk_budget_and_hub_only() -> None:
    from streamq.app.run import QUANT_TYPES, Conversion, choose_disk_budget, default_output

    assert default_output("Qwen/Qwen3-8B@main", "nf4", "me") == "me/Qwen3-8B-nf4"
    assert default_output("Qwen/Qwen3-8B", "fp4", None) == ""
    summary = {"disk_needed_bytes": 24, "disk_least_bytes": 16}
    assert choose_disk_budget(summary, free=1000) == 24  # the run's default: two outputs, the largest tensor, the read-ahead
    assert choose_disk_budget(summary, free=20) == 16  # else 80 % of the free space, if that holds the least
    assert choose_disk_budget(summary, free=15) is None  # else the run's own minimum, which reports the shortfall
    for source, output in (("./model", "me/x"), ("org/model", "/tmp/out"), ("org/model", "me/x@dev")):
        with pytest.raises(ValueError):
            Conversion(source, output)
    assert Conversion("org/m", "me/x", "fp4", False).options()["double_quant"] is False
    assert "token=" not in repr(Conversion("org/m", "me/x", token=SENTINEL)) and SENTINEL not in repr(Conversion("org/m", "me/x", token=SENTINEL))
    with pytest.raises(ValueError, match="quant type must be one of"):
        Conversion("org/m", "me/x", "int3").options()
    assert set(QUANT_TYPES) >= {"nf4", "fp4"}
    # GGUF: gguf-my-repo's name; llama.cpp's type and the format, without bitsandbytes' options
    assert default_output("Qwen/Qwen3-8B@main", "gguf-q4_k_m", "me") == "me/Qwen3-8B-Q4_K_M-GGUF"
    options = Conversion("org/m", "me/x", "gguf-q8_0", False, "float16").options()
    assert options["format"] == "gguf" and options["quant_type"] == "q8_0" and "double_quant" not in options and "compute_dtype" not in options
    assert "format" not in Conversion("org/m", "me/x", "bf16").options()  # the dequantized safetensors bf16, not GGUF's


def test_streamq_app_without_the_extra_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['gradio'] = None; from streamq.cli import main; sys.exit(main(['app']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == 'streamq: error: the app needs its extra packages (gradio is missing): pip install "streamq[app]"'
