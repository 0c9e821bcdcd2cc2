"""The control plane's process never imports torch, timm or Ray Data: not at start-up and not after a POST.

A control-plane pod pays neither their start-up time nor their memory; checks that need them run in the jobs.
Each check runs in a fresh interpreter, so that nothing another test imported counts.
"""

import json
import subprocess
import sys

HEAVY = ("torch", "timm", "ray.data", "ray.train")

SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from api.app import create_app
from service.control import ControlPlane
from service.jobs import Jobs
from service.principals import Principals, Role
from service.settings import Settings
from service.store import Store

root, data = sys.argv[1], sys.argv[2]
settings = Settings(data_dir=data, source_roots=[root])
principals = Principals()
principals.add("w", Role.WRITE)
control = ControlPlane(settings, Store(settings.database), Jobs("http://127.0.0.1:9", timeout=1), principals)
heavy = {HEAVY!r}
loaded = {{"start": [m for m in heavy if m in sys.modules]}}
body = {{"labeled": root + "/labeled", "unlabeled": root + "/unlabeled", "eval": root + "/test"}}
with TestClient(create_app(control)) as client:
    h = {{"Authorization": "Bearer w"}}
    good = client.post("/generations", json={{**body, "student": {{"architecture": "resnet18"}}}}, headers=h)
    bad = client.post("/generations", json={{**body, "student": {{"architecture": "resnet181"}}}}, headers=h)
    listed = client.get("/generations/" + good.json()["id"], headers=h)
    loaded["after"] = [m for m in heavy if m in sys.modules]
    loaded["status"] = [good.status_code, bad.status_code, listed.status_code]
    loaded["bad"] = bad.json()["detail"][0]["msg"]
print(json.dumps(loaded))
"""


def test_the_api_process_imports_no_torch_timm_or_ray_data(digits_root, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(HEAVY=HEAVY), str(digits_root), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["status"] == [202, 422, 200]
    assert "unknown architecture 'resnet181'" in found["bad"]
    assert found["start"] == [] and found["after"] == [], found
