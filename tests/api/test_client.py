"""`nstudent generations ...` and `nstudent datasets ...` against the API served over HTTP (in process, Ray down):
tables and --json, cancel and retry, and every failure as one line on stderr with exit status 1."""

import json
import time

import pytest
from typer.testing import CliRunner

from service.cli import app as cli
from service.cluster import free_port
from tests.api.conftest import Served


@pytest.fixture
def served(tmp_path, digits_root):
    s = Served(tmp_path / "data", digits_root)
    yield s
    s.stop()


@pytest.fixture
def server(served):
    return served.url


def run(url: str, *args: str, token: str = "writer-token"):
    return CliRunner().invoke(cli, list(args), env={"NSTUDENT_URL": url, "NSTUDENT_TOKEN": token})


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def spec_file(tmp_path, digits_root, **kw) -> str:
    body = {
        "labeled": str(digits_root / "labeled"),
        "unlabeled": str(digits_root / "unlabeled"),
        "eval": str(digits_root / "test"),
        **kw,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_create_list_show_cancel_retry(server, tmp_path, digits_root):
    created = run(server, "generations", "create", spec_file(tmp_path, digits_root, iterations=2), "--json")
    assert created.exit_code == 0, created.output
    chain = json.loads(created.stdout)["chain"]
    assert len(chain) == 2

    listing = json.loads(run(server, "generations", "list", "--json").stdout)
    assert listing["count"] == 2 and {g["id"] for g in listing["data"]} == set(chain)
    table = run(server, "generations", "list", "--token", "reader-token")  # the flag wins over the environment
    assert table.exit_code == 0 and all(gid in table.stdout for gid in chain) and "generations 1-2 of 2" in table.stdout

    shown = run(server, "generations", "show", chain[1])
    assert shown.exit_code == 0 and chain[1] in shown.stdout and "queued" in shown.stdout
    assert json.loads(run(server, "generations", "show", chain[1], "--json").stdout)["parent_id"] == chain[0]

    cancelled = run(server, "generations", "cancel", chain[0])
    assert cancelled.exit_code == 0 and f"{chain[0]}: cancel requested" in cancelled.stdout
    deadline = time.time() + 30  # the orchestrator moves it to cancelled on its next pass
    while json.loads(run(server, "generations", "show", chain[0], "--json").stdout)["stage"] != "cancelled":
        assert time.time() < deadline
        time.sleep(0.2)
    # watch ends at once for a finished generation: a line saying how it ended, exit status 1 (not succeeded).
    watched = run(server, "generations", "watch", chain[0])
    assert watched.exit_code == 1 and f"{chain[0]} cancelled" in watched.stdout

    retried = run(server, "generations", "retry", chain[0], "--json")
    assert retried.exit_code == 0 and json.loads(retried.stdout)["retries"] == 1
    assert json.loads(run(server, "generations", "show", chain[0], "--json").stdout)["stage"] != "cancelled"


def test_every_failure_is_one_line(server, tmp_path, digits_root):
    assert "404" in one_error_line(run(server, "generations", "show", "g-0000000000000000"))
    assert "no dataset" in one_error_line(run(server, "datasets", "show", "d-0000000000000000"))
    assert "404" in one_error_line(run(server, "datasets", "manifest", "d-0000000000000000"))
    line = one_error_line(run(server, "generations", "list", token="wrong"))
    assert "401" in line and "NSTUDENT_TOKEN" in line
    assert "403" in one_error_line(
        run(server, "generations", "create", spec_file(tmp_path, digits_root), token="reader-token")
    )
    bad = one_error_line(run(server, "generations", "create", spec_file(tmp_path, digits_root, iterations=0)))
    assert "422" in bad and "iterations" in bad
    assert "cannot read" in one_error_line(run(server, "generations", "create", str(tmp_path / "missing.json")))
    down = one_error_line(run(f"http://127.0.0.1:{free_port()}", "generations", "list"))
    assert "cannot reach the nstudent server" in down


def test_watch_rides_out_a_server_restart(served, tmp_path, digits_root):
    """`nstudent generations watch` (its own process) follows a generation while the server stops and starts
    again on the same port: it says the server does not answer, asks again, and ends when the generation does.
    With --patience 0 it fails at once, in one line."""
    import os
    import subprocess
    import sys

    gid = json.loads(run(served.url, "generations", "create", spec_file(tmp_path, digits_root), "--json").stdout)[
        "chain"
    ][0]
    env = {**os.environ, "NSTUDENT_URL": served.url, "NSTUDENT_TOKEN": "writer-token"}
    nstudent = os.path.join(os.path.dirname(sys.executable), "nstudent")
    watch = [nstudent, "generations", "watch", gid, "--interval", "0.2"]
    watcher = subprocess.Popen([*watch, "--patience", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # following it: the generation is queued (the app's Ray is down)
        served.stop()
        impatient = subprocess.run([*watch, "--patience", "0"], env=env, capture_output=True, text=True, timeout=60)
        assert impatient.returncode == 1 and "cannot reach the nstudent server" in impatient.stderr
        assert len(impatient.stderr.strip().splitlines()) == 1 and "Traceback" not in impatient.stderr
        time.sleep(2)
        assert watcher.poll() is None  # still asking
        served.start()
        assert run(served.url, "generations", "cancel", gid).exit_code == 0
        out, _ = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    text = out.decode()
    assert watcher.returncode == 1, text  # ended, and not succeeded
    assert "cannot reach the nstudent server" in text and "asking again for up to 60s" in text
    assert "the server answers again" in text and f"{gid} cancelled" in text and "Traceback" not in text
