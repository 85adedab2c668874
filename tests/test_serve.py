"""`sparvar serve`: the comparison behind the page, the page's endpoint driven through
gradio_client against a real server, and the page itself in headless Chromium (marker `browser`)."""

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import difference_picture, tiny_pipeline, var_pipeline
from sparvar.cli import main
from sparvar.errors import SparvarError
from sparvar.eval.metrics import psnr, to_tensor
from sparvar.generation import GenerationConfig
from sparvar.models.registry import get_spec
from sparvar.serve import compare
from sparvar.validation import validate


def _table_psnr(table: str) -> float:
    return float(re.search(r"\| ([\d.]+|inf) dB \|", table).group(1))


@pytest.mark.slow
def test_compare_dense_against_a_preset():
    pipe, seen = var_pipeline(), []
    dense, other, diff, table = compare(pipe, "3", 0, 4.0, "1:1", "default+skip1", lambda d, what: seen.append(d))
    assert np.asarray(dense).tolist() == np.asarray(pipe([3], seed=0, cfg=4.0, progress=False).images[0]).tolist()
    assert other.size == diff.size == dense.size
    assert np.abs(np.asarray(diff).astype(int) - difference_picture(dense, other)).max() <= 1
    db = float(psnr(to_tensor([other]), to_tensor([dense]))[0])
    assert math.isfinite(db) and _table_psnr(table) == pytest.approx(db, abs=0.005)
    assert "| dense |" in table and "| default+skip1 |" in table
    scales = len(pipe.schedule("1:1"))
    assert len(seen) == 2 * scales - 1 and seen == sorted(seen) and seen[-1] == 1.0  # one step per scale run


@pytest.mark.slow
def test_compare_runs_dense_once_per_image():
    pipe, last_dense, seen = var_pipeline(), {}, []
    first = compare(pipe, "3", 0, 4.0, "1:1", "default", last_dense=last_dense)
    again = compare(pipe, "3", 0, 4.0, "1:1", "csla", lambda d, what: seen.append(what), last_dense)
    assert len(seen) == len(pipe.schedule("1:1")) and all(w.startswith("csla:") for w in seen)  # no dense scale
    assert np.asarray(again[0]).tolist() == np.asarray(first[0]).tolist()
    assert again[3].splitlines()[2] == first[3].splitlines()[2]  # the same dense row
    compare(pipe, "3", 1, 4.0, "1:1", "csla", lambda d, what: seen.append(what), last_dense)
    assert any(w.startswith("dense:") for w in seen)  # another seed, another dense image


def test_compare_a_preset_with_itself_gives_zero_difference():
    dense, other, diff, table = compare(var_pipeline(), "3", 1, 4.0, "1:1", "dense")
    assert np.asarray(dense).tolist() == np.asarray(other).tolist()
    assert (np.asarray(diff) == [68, 1, 84]).all()  # the ramp's first colour: no difference anywhere
    assert _table_psnr(table) == math.inf


@pytest.mark.parametrize("condition, aspect, preset, message", [
    ("3", "1:1", "nonsense", "cannot read 'nonsense'"),
    ("3", "1:1", "default+skip10", "skip_last must be in"),
    ("3", "4:3", "default", "only 1:1 images"),
    ("unicorn", "1:1", "default", "not 'unicorn'"),
])
def test_compare_bad_input_fails_before_any_scale(condition, aspect, preset, message):
    seen = []
    with pytest.raises(SparvarError, match=message):
        compare(var_pipeline(), condition, 0, 3.0, aspect, preset, lambda d, what: seen.append(d))
    assert seen == []


@pytest.mark.slow
def test_page_asks_for_a_prompt_or_a_class():
    pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    from sparvar.serve import build_app

    for pipe, kind in ((tiny_pipeline(), "textbox"), (var_pipeline(), "dropdown")):
        app = build_app(pipe)
        assert [b.get_block_name() for b in app.blocks.values() if b.elem_id == "condition"] == [kind]
        assert [fn.concurrency_limit for fn in app.fns.values() if fn.api_name == "generate"] == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sparvar serve` with the demo model on a free localhost port, stopped after the module: its
    address, and the file its output goes to (its log)."""
    pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    url = f"http://127.0.0.1:{_free_port()}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sparvar", "serve", "--port", url.split(":")[-1][:-1],
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server stopped:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not answer:\n{log_path.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield url, log_path
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_serve_errors_are_one_line_before_the_model_loads(capsys, monkeypatch):
    pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    import sparvar.loading

    monkeypatch.setattr(sparvar.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for options, message in (
            (["--model", "nope"], "unknown model 'nope'"),
            (["--port", str(port)], f"cannot serve on 127.0.0.1:{port} (Address already in use); choose another "
                                    "--port or --host"),
            (["--port", "99999"], "argument --port: a port is a number in 1..65535, not '99999' (see sparvar serve "
                                  "--help)"),
        ):
            assert main(["serve", "--device", "cpu", *options]) == 2
            err = capsys.readouterr().err
            assert message in err and err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_the_page_offers_the_aspect_ratios_the_model_takes():
    pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    from types import SimpleNamespace

    from sparvar.schedules import INFINITY_ASPECTS
    from sparvar.serve import build_app

    for name, aspects in (("infinity-demo", ["1:1"]), ("var-tiny", ["1:1"]), ("infinity-tiny", list(INFINITY_ASPECTS))):
        app = build_app(SimpleNamespace(spec=get_spec(name), device="cpu"))  # the page reads these two
        offered = [b for b in app.blocks.values() if getattr(b, "label", None) == "aspect (width:height)"]
        assert [choice for choice, _ in offered[0].choices] == aspects, name


@pytest.mark.slow
def test_the_page_starts_with_the_models_example_prompt():
    pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    from types import SimpleNamespace

    from sparvar.serve import build_app

    for name, value in (("infinity-demo", "grinning face"), ("infinity-tiny", None)):
        app = build_app(SimpleNamespace(spec=get_spec(name), device="cpu"))
        assert [b.value for b in app.blocks.values() if b.elem_id == "condition"] == [value], name


@pytest.mark.slow
def test_refused_requests_name_no_option_and_leave_no_traceback():
    """A mistake on the page is one message in it: no command-line flag, nothing in the log."""
    gr = pytest.importorskip("gradio", reason="the UI extra is not installed (pip install -e '.[ui]')")
    from sparvar.serve import build_app

    generate = next(fn.fn for fn in build_app(var_pipeline()).fns.values() if fn.api_name == "generate")
    for condition, aspect, preset in (("3", "4:3", "default"), ("3", "1:1", "default+skip10"), ("", "1:1", "default"),
                                      ("3", "1:1", "default+skip2+skip3"), ("unicorn", "1:1", "default")):
        with pytest.raises(gr.Error) as refused:
            generate(condition, 0, 3.0, aspect, preset)
        assert refused.value.print_exception is False and "--" not in refused.value.message, refused.value.message
    demo = get_spec("infinity-demo")  # a model trained on two square schedules, asked for another
    with pytest.raises(SparvarError) as refused:
        validate(demo, ["cat face"], GenerationConfig(aspect="4:3"), torch.device("cpu"), torch.float32)
    assert "--" not in str(refused.value) and "skipping its last scales stops it early" in str(refused.value)


@pytest.mark.slow
def test_the_density_of_a_skipping_preset_counts_against_a_full_dense_generation():
    """default+skip2 showed 71.8% against default's 25.3%: the share was of the scales that ran."""
    pipe = tiny_pipeline()  # 13 scales up to 64x64, where default is sparse
    schedule = pipe.schedule("1:1")
    pairs = np.array([n * schedule.kv_length(k) for k, n in enumerate(schedule.lengths)], dtype=float)
    density = {}
    for preset in ("dense+skip2", "default", "default+skip2"):
        table = compare(pipe, "a cat", 0, 3.0, "1:1", preset)[3]
        assert "| attention density (of a full dense generation) |" in table
        density[preset] = float(re.search(rf"\| {re.escape(preset)} \| [\d.]+ s \| ([\d.]+)% \|", table).group(1))
    assert density["dense+skip2"] == round(100 * pairs[:-2].sum() / pairs.sum(), 1)
    assert density["default+skip2"] < density["default"] < 100


def _client(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


@pytest.mark.slow
def test_bad_input_shows_a_message_and_the_server_keeps_serving(server, tmp_path):
    from gradio_client.exceptions import AppError

    url, log = server
    client = _client(url, tmp_path)
    bad = [("", 0, "default", "give a prompt"),
           ("cat face", -1, "default", "seed must be in 0..9223372036854775807, got -1"),
           ("cat face", 0, "default+warp", "cannot read 'warp'")]
    for condition, seed, preset, message in bad:
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(condition, seed, 3.0, "1:1", preset, api_name="/generate")
    assert urllib.request.urlopen(url, timeout=5).status == 200
    assert "Traceback" not in log.read_text()  # refused requests are no server errors


@pytest.mark.slow
def test_generate_through_the_client(server, tmp_path):
    spec = get_spec("infinity-demo")
    dense, other, diff, table = _client(server[0], tmp_path).predict(
        spec.example, 0, spec.transformer.cfg, "1:1", "default+skip2", api_name="/generate")
    dense, other, diff = (Image.open(path).convert("RGB") for path in (dense, other, diff))
    assert dense.size == other.size == diff.size and min(dense.size) >= 32
    assert np.asarray(dense).std() > 10  # an image, not a flat colour
    assert np.asarray(dense).tolist() != np.asarray(other).tolist()  # skipping two scales changes it
    assert np.abs(np.asarray(diff).astype(int) - difference_picture(dense, other)).max() <= 1
    assert _table_psnr(table) == pytest.approx(float(psnr(to_tensor([other]), to_tensor([dense]))[0]), abs=0.005)
    assert re.search(r"\| dense \| [\d.]+ s \| 100\.0% \|", table)


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Chromium: apt-get install chromium chromium-driver")
    return webdriver


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_a_browser(server, tmp_path):
    """Types a condition, presses Generate, waits for the three images; saves a screenshot (to
    $SPARVAR_SCREENSHOT when set: that is how docs/serve.png is made)."""
    webdriver = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(server[0])
        wait = WebDriverWait(driver, 60)
        field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#condition input, #condition textarea"))
        field.send_keys(Keys.CONTROL, "a", Keys.NULL, "woman judge", Keys.ENTER)
        driver.find_element(By.ID, "generate").click()
        loaded = "return [...document.querySelectorAll('#outputs img')].filter(i => i.naturalWidth > 0).length"
        WebDriverWait(driver, 600).until(lambda d: d.execute_script(loaded) == 3)
        assert "PSNR against dense" in driver.find_element(By.ID, "table").text
        assert field.get_attribute("value") == "woman judge"
        assert not driver.find_elements(By.CSS_SELECTOR, ".toast-body.error")
        shot = Path(os.environ.get("SPARVAR_SCREENSHOT", tmp_path / "serve.png"))
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
    finally:
        driver.quit()
