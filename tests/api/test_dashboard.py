"""The service as people use it, for real: `nstudent serve` with its own Ray head runs a generation over the
digits; `nstudent generations watch` follows it on a terminal (a pty), and headless Chromium loads every page
of the dashboard against it.

The browser tests fail on any JavaScript console error (network errors included), check that the numbers
shown are the API's, and save full-page screenshots in ``test-output/dashboard/`` at the top of the
repository (``NSTUDENT_TEST_OUTPUT`` names another folder), printed at the end: pytest's own temporary
folders are deleted by the next runs. Without Chromium they skip, unless NSTUDENT_REQUIRE_BROWSER=1 (CI),
where they fail.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import sources
from tests.api.conftest import Served, running_server, train

pytestmark = pytest.mark.slow
READ = {"Authorization": "Bearer r-token"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRE_BROWSER = os.environ.get("NSTUDENT_REQUIRE_BROWSER") == "1"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def server(tmp_path_factory, digits_root):
    with running_server(tmp_path_factory.mktemp("serve-dashboard"), digits_root, NSTUDENT_PROGRESS_SECONDS="0.5") as s:
        yield s


@pytest.fixture(scope="module")
def generation(server, digits_root) -> dict:
    """A generation that trains its teacher, posted and not waited for: the first test follows it."""
    body = {
        "labeled": str(digits_root / "labeled"),
        "unlabeled": str(digits_root / "unlabeled"),
        "eval": str(digits_root / "test"),
        "curation": {"confidence_floor": 0.15},
        "teacher_config": train(30),
        "student": train(20),
    }
    r = httpx.post(f"{server.url}/generations", json=body, headers={"Authorization": "Bearer w-token"}, timeout=30)
    assert r.status_code == 202, r.text
    return {"id": r.json()["id"]}


def api(server, path: str):
    r = httpx.get(f"{server.url}{path}", headers=READ, timeout=30)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


# --- the terminal client -------------------------------------------------------------------------------------


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command on a pseudo-terminal, as a person would see it; returns (exit status, all it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(master)
    return status, b"".join(chunks).decode("utf-8", "replace")


def bar_values(screen: str, title: str, unit: str) -> list[tuple[int, int]]:
    """Successive (done, total) that the bar titled ``title`` showed, each change once."""
    values: list[tuple[int, int]] = []
    for m in re.finditer(rf"{title}\s+\S+\s+([\d,]+)/([\d,]+) {unit}", screen):
        v = (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")))
        if not values or values[-1] != v:
            values.append(v)
    return values


def test_watch_shows_moving_bars_for_a_live_generation(server, generation, browser, screenshots):
    env = {
        **os.environ,
        "NSTUDENT_URL": server.url,
        "NSTUDENT_TOKEN": "r-token",
        "TERM": "xterm-256color",
        "COLUMNS": "150",
        "LINES": "40",
    }
    nstudent = os.path.join(os.path.dirname(sys.executable), "nstudent")
    result: dict = {}
    watcher = threading.Thread(
        target=lambda: result.update(
            out=run_in_pty([nstudent, "generations", "watch", generation["id"], "--interval", "0.5"], env, timeout=1500)
        )
    )
    watcher.start()
    # Meanwhile, the dashboard shows the generation running and refreshes by itself.
    if browser is not None:
        running_page_refreshes(server, generation["id"], browser, screenshots)
    watcher.join()
    status, raw = result["out"]
    screen = ANSI.sub("", raw)
    (screenshots / "watch.txt").write_text(screen)
    assert status == 0, screen[-3000:]
    assert f"{generation['id']} succeeded" in screen

    labeling = bar_values(screen, "labeling", "images")
    teacher, student = bar_values(screen, "teacher", "steps"), bar_values(screen, "training", "steps")
    total = labeling[-1][1]
    assert total == 5000 - 150  # the unlabeled pool
    # The bars moved: each count went up through values short of the end, never down (a finished bar shows
    # its time instead of its count).
    for values, end in ((labeling, total), (teacher, 30), (student, 20)):
        done = [d for d, _ in values]
        assert done == sorted(done) and {e for _, e in values} == {end}, values
    assert len([d for d, _ in labeling if 0 < d < total]) >= 2, labeling
    assert any(0 < d < 30 for d, _ in teacher) or any(0 < d < 20 for d, _ in student), (teacher, student)
    # Training shows its loss, images/s and an ETA; labeling its rate; each stage its time when it finishes.
    assert re.search(r"(teacher|training)\s.*steps\s+ETA.*loss \d+\.\d{3}\s+[\d,]+ img/s", screen), screen[-3000:]
    assert re.search(r"labeling\s.*images\s+ETA.*[\d,]+ img/s", screen)
    for stage in ("teacher", "labeling", "curating", "training", "evaluating"):
        assert re.search(rf"{stage}\s+\S+\s+done in \d+s", screen), stage
    generation.update(api(server, f"/generations/{generation['id']}"))


# --- the browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screenshots() -> Path:
    root = os.environ.get("NSTUDENT_TEST_OUTPUT") or Path(__file__).resolve().parents[2] / "test-output"
    path = Path(root) / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):  # this run's pictures only
        old.unlink()
    yield path
    print(f"\nscreenshots: {path}")


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return None
    return f"no headless browser ({', '.join(missing)}): apt-get install chromium chromium-driver; .ci/run does"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages, closed-network flags, a fresh profile; None when missing
    (the watch test runs without it), and the browser tests skip (or fail under NSTUDENT_REQUIRE_BROWSER=1)."""
    if _browser_missing():
        yield None
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nst-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    if browser is None:
        reason = _browser_missing()
        if REQUIRE_BROWSER:
            pytest.fail(f"NSTUDENT_REQUIRE_BROWSER=1: {reason}")
        pytest.skip(reason)
    return browser


def console_errors(driver) -> list[dict]:
    """Console errors since the last call: JavaScript errors, console.error, failed requests."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def load(driver, server, route: str, ready_css: str, timeout: float = 60) -> None:
    """Open a route of the dashboard and wait until the page says it rendered and ``ready_css`` is there."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server.url}/ui#{route}")
    WebDriverWait(driver, timeout).until(
        lambda d: (
            d.execute_script("return document.body.dataset.loaded !== undefined")
            and d.execute_script(f"return document.querySelector({json.dumps(ready_css)}) !== null")
        )
    )


def shoot(driver, screenshots: Path, name: str) -> None:
    """A full-page screenshot (Chromium's DevTools protocol: the whole page, not only the window)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    (screenshots / name).write_bytes(base64.b64decode(shot["data"]))


def sign_in(driver, server, screenshots: Path | None = None, token: str = "r-token") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server.url}/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{server.url}/ui")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "token-form").is_displayed())
    if screenshots is not None:
        shoot(driver, screenshots, "token.png")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.querySelector('#generations') !== null")
    )


def running_page_refreshes(server, generation_id: str, driver, screenshots: Path) -> None:
    """While the generation runs, its page shows its stage and progress and refreshes without a reload."""
    from selenium.webdriver.support.ui import WebDriverWait

    deadline = time.time() + 900
    while True:  # until the teacher's bar has moved
        g = api(server, f"/generations/{generation_id}")
        if g["progress"].get("step") or g["progress"].get("done") or g["stage"] in ("succeeded", "failed"):
            break
        assert time.time() < deadline
        time.sleep(0.5)
    sign_in(driver, server)
    shoot(driver, screenshots, "generations-running.png")
    load(driver, server, f"/generations/{generation_id}", "#timings")
    first = driver.execute_script("return document.querySelector('#main').textContent")
    shoot(driver, screenshots, "generation-running.png")
    # Same page, no navigation: the text changes as the job reports progress and stages.
    WebDriverWait(driver, 600, poll_frequency=0.5).until(
        lambda d: d.execute_script("return document.querySelector('#main').textContent") != first
    )
    assert console_errors(driver) == []


def test_the_pages_show_the_apis_numbers(server, generation, page, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if generation.get("stage") != "succeeded":
        pytest.skip("needs the generation that the watch test follows")
    gid, did = generation["id"], generation["dataset_id"]
    driver = page
    sign_in(driver, server, screenshots)
    # The token lives in this tab's sessionStorage and goes out as a bearer header; no cookie anywhere.
    assert driver.execute_script("return sessionStorage.getItem('nstudent.token')") == "r-token"
    assert driver.get_cookies() == [] and driver.execute_script("return document.cookie") == ""

    # Generations: list, lineage and the accuracy chart.
    load(driver, server, "/", f"tr[data-generation='{gid}']")
    listing = api(server, "/generations?limit=200")
    assert int(driver.find_element(By.ID, "generation-count").get_attribute("data-value")) == listing["count"]
    for g in listing["data"]:
        row = driver.find_element(By.CSS_SELECTOR, f"#generations tr[data-generation='{g['id']}']")
        assert row.find_element(By.CSS_SELECTOR, "[data-field=stage]").text == g["stage"]
        acc = row.find_element(By.CSS_SELECTOR, "td[data-field=test_accuracy]")
        assert float(acc.get_attribute("data-value")) == g["metrics"]["test_accuracy"]
        assert acc.text == f"{100 * g['metrics']['test_accuracy']:.2f}%"
        assert driver.find_elements(By.CSS_SELECTOR, f"#lineage li[data-generation='{g['id']}']")
    chart = driver.find_element(By.ID, "accuracy-chart")
    assert chart.find_elements(By.TAG_NAME, "canvas") and int(chart.get_attribute("data-points")) == sum(
        g["stage"] == "succeeded" for g in listing["data"]
    )
    shoot(driver, screenshots, "generations.png")
    assert console_errors(driver) == []

    # One generation: stage, timings, metrics, jobs.
    g = api(server, f"/generations/{gid}")
    load(driver, server, f"/generations/{gid}", "#timings")
    assert driver.find_element(By.CSS_SELECTOR, "h1 [data-field=stage]").text == "succeeded"
    for stage, t in g["timings"].items():
        cell = driver.find_element(By.CSS_SELECTOR, f"#timings tr[data-stage='{stage}'] td[data-field=seconds]")
        assert float(cell.get_attribute("data-value")) == t["seconds"]
    for name, value in g["metrics"].items():
        cell = driver.find_element(By.CSS_SELECTOR, f"#metrics tr[data-metric='{name}'] td[data-field=value]")
        assert float(cell.get_attribute("data-value")) == value
    attempts = [a for runs in g["jobs"].values() for a in runs]
    shown = {
        r.get_attribute("data-attempt"): r.find_element(By.CSS_SELECTOR, "[data-field=status]").text
        for r in driver.find_elements(By.CSS_SELECTOR, "#jobs tr[data-attempt]")
    }
    assert shown == {a["id"]: a["status"] for a in attempts}
    assert driver.find_element(By.ID, "dataset-link").text == did
    shoot(driver, screenshots, "generation.png")
    assert console_errors(driver) == []

    # The dataset: summary, per-class bars, rejects, histograms, samples, manifest.
    d = api(server, f"/datasets/{did}")
    load(driver, server, f"/datasets/{did}", "#manifest tbody tr")
    for key in ("images_seen", "images_decoded", "images_per_class", "manifest_rows", "manifest_copies"):
        cell = driver.find_element(By.CSS_SELECTOR, f"#summary td[data-field={key}]")
        assert int(cell.get_attribute("data-value")) == d[key] and cell.text.replace(",", "") == str(d[key])
    assert int(
        driver.find_element(By.CSS_SELECTOR, "#summary td[data-field=rejected]").get_attribute("data-value")
    ) == sum(d["rejected"].values())
    for c in d["classes"]:
        row = driver.find_element(By.CSS_SELECTOR, f"#classes tr[data-class='{c['class_index']}']")
        for key in ("predicted", "above_floor", "kept", "copies"):
            cell = row.find_element(By.CSS_SELECTOR, f"td[data-field={key}]")
            assert cell.text.replace(",", "") == str(c[key]), (c["class_index"], key)
        assert (
            float(row.find_element(By.CSS_SELECTOR, "td[data-field=threshold]").get_attribute("data-value"))
            == c["threshold"]
        )
    histograms = driver.find_elements(By.CSS_SELECTOR, "#histograms .histogram")
    assert [float(h.get_attribute("data-threshold")) for h in histograms] == [c["threshold"] for c in d["classes"]]
    assert all(h.find_elements(By.TAG_NAME, "canvas") for h in histograms)
    if d["rejected"]:
        for reason, n in d["rejected"].items():
            row = driver.find_element(By.CSS_SELECTOR, f"#rejects tr[data-reason='{reason}']").text
            assert str(n) in row.replace(",", ""), (reason, n, row)
    else:
        assert driver.find_element(By.ID, "rejects").get_attribute("data-value") == "0"

    # Samples: the API's rows, every thumbnail loaded, at most 96 px.
    samples = httpx.get(f"{server.url}/datasets/{did}/samples?per_class=8", headers=READ).content
    expected = {c: [str(r["image_id"]) for r in rows] for c, rows in json.loads(samples.decode()).items()}
    WebDriverWait(driver, 120).until(
        lambda dr: dr.execute_script(
            "return [...document.querySelectorAll('#samples img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    shown = {
        r.get_attribute("data-class"): [
            f.get_attribute("data-image-id") for f in r.find_elements(By.TAG_NAME, "figure")
        ]
        for r in driver.find_elements(By.CSS_SELECTOR, "#samples .row")
    }
    assert shown == expected and sum(map(len, shown.values())) > 0
    sizes = driver.execute_script(
        "return [...document.querySelectorAll('#samples img.thumb')].map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert all(0 < w <= 96 and 0 < h <= 96 for w, h in sizes)

    # The manifest browser: the API's first page, then the next.
    def manifest_ids() -> list[str]:  # in one script: the table may be redrawn between two WebDriver calls
        return driver.execute_script(
            "return [...document.querySelectorAll('#manifest tbody tr')].map(r => r.dataset.imageId)"
        )

    first_page = _manifest_ids(server, did, 0, 50)
    assert manifest_ids() == first_page
    assert int(driver.find_element(By.ID, "manifest-range").get_attribute("data-count")) == d["manifest_rows"]
    shoot(driver, screenshots, "dataset.png")
    if d["manifest_rows"] > 50:
        driver.find_element(By.ID, "manifest-next").click()
        WebDriverWait(driver, 30).until(lambda dr: manifest_ids() != first_page)
        assert manifest_ids() == _manifest_ids(server, did, 50, 50)
        shoot(driver, screenshots, "dataset-manifest-page-2.png")
    assert console_errors(driver) == []


def _manifest_ids(server, dataset_id: str, offset: int, limit: int) -> list[str]:
    """Image ids of a manifest page as the JSON text has them (int64: compared as text, never as a float)."""
    text = httpx.get(f"{server.url}/datasets/{dataset_id}/manifest?offset={offset}&limit={limit}", headers=READ).text
    return re.findall(r'"image_id":\s*(-?\d+)', text)


def test_thumbnails_only_of_images_in_the_manifest(server, generation, digits_root):
    if generation.get("stage") != "succeeded":
        pytest.skip("needs the generation that the watch test follows")
    did = generation["dataset_id"]
    d = api(server, f"/datasets/{did}")
    kept = pq.read_table(d["manifest_uri"]).to_pylist()
    ok = httpx.get(f"{server.url}/datasets/{did}/images/{kept[0]['image_id']}/thumbnail", headers=READ)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(ok.content))
    assert max(img.size) <= 96 and img.size == Image.open(kept[0]["uri"]).size  # digits are 28 px: not enlarged
    assert httpx.get(f"{server.url}/datasets/{did}/images/{kept[0]['image_id']}/thumbnail").status_code == 401

    # An image of the pool that curation did not keep, and an id of nothing: not served.
    kept_uris = {r["uri"] for r in kept}
    dropped = next(str(p) for p in sorted((digits_root / "unlabeled").rglob("*.png")) if str(p) not in kept_uris)
    for image_id in (sources.image_id(dropped), 12345):
        r = httpx.get(f"{server.url}/datasets/{did}/images/{image_id}/thumbnail", headers=READ)
        assert r.status_code == 404 and "not in dataset" in r.json()["detail"]

    # A manifest row naming a file outside the generation's source roots is refused, though it is listed.
    outside = tempfile.NamedTemporaryFile(suffix=".png", dir="/tmp", delete=False)
    Image.new("L", (8, 8)).save(outside, format="PNG")
    outside.close()
    extra = Path(d["manifest_uri"]) / "zz-outside.parquet"
    row = {**kept[0], "image_id": sources.image_id(outside.name), "uri": outside.name}
    pq.write_table(
        pa.Table.from_pylist([row], schema=pq.read_schema(next(Path(d["manifest_uri"]).glob("*.parquet")))), extra
    )
    try:
        r = httpx.get(f"{server.url}/datasets/{did}/images/{row['image_id']}/thumbnail", headers=READ)
        assert r.status_code == 404 and "outside" in r.json()["detail"]
    finally:
        extra.unlink()
        os.unlink(outside.name)


def test_the_dashboard_is_served_offline_and_small(server):
    page = httpx.get(f"{server.url}/ui")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', page.text)
    assert len(assets) == 4
    total = len(gzip.compress(page.content))
    for path in assets:
        r = httpx.get(f"{server.url}{path}", headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        total += int(r.headers["content-length"])
        # Every asset is this server's: no URL of another host in the code (the banner comment aside).
        body = re.sub(r"/\*!.*?\*/", "", r.text, flags=re.S)
        assert not re.search(r"https?://", body), path
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    assert total <= 500 * 1024, total


def test_a_page_rides_out_a_server_restart(page, tmp_path, digits_root):
    """A generation's page open while its server stops and starts again on the same port (the in-process app,
    Ray down: the generation stays queued): the page keeps what it shows, its status line says the server does
    not answer, and it refreshes again once the server is back, with no reload and no error box."""
    from selenium.webdriver.support.ui import WebDriverWait

    served = Served(tmp_path / "data", digits_root)
    try:
        body = {k: str(digits_root / k) for k in ("labeled", "unlabeled")} | {"eval": str(digits_root / "test")}
        r = httpx.post(f"{served.url}/generations", json=body, headers={"Authorization": "Bearer writer-token"})
        assert r.status_code == 202, r.text
        gid = r.json()["id"]
        sign_in(page, served, token="reader-token")
        load(page, served, f"/generations/{gid}", "#generation-id")

        def status(d) -> str:
            return d.execute_script("return document.getElementById('status').textContent")

        WebDriverWait(page, 30).until(lambda d: status(d).startswith("refreshing every"))
        served.stop()
        WebDriverWait(page, 30).until(lambda d: "the server does not answer" in status(d))
        assert page.execute_script("return document.getElementById('generation-id').textContent") == gid
        assert page.execute_script("return document.getElementById('page-error')") is None
        served.start()
        WebDriverWait(page, 30).until(lambda d: status(d).startswith("refreshing every"))
        assert page.execute_script("return document.getElementById('generation-id').textContent") == gid
        assert page.execute_script("return document.getElementById('page-error')") is None
        # The refused requests are the only console errors.
        errors = console_errors(page)
        assert all("ERR_CONNECTION_REFUSED" in e["message"] for e in errors), errors
    finally:
        served.stop()
