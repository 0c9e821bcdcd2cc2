"""The API in process, with a real SQLite store and Ray down: auth, validation, idempotency, paging, cancel."""

import time

import pytest

from tests.api.conftest import READ, WRITE


def request(root, **kw):
    body = {"labeled": str(root / "labeled"), "unlabeled": str(root / "unlabeled"), "eval": str(root / "test")}
    return {**body, **kw}


def test_no_token_is_401_a_wrong_token_401_and_a_read_token_may_not_write(client, digits_root):
    assert client.get("/generations").status_code == 401
    assert client.get("/generations").headers["www-authenticate"] == "Bearer"
    r = client.get("/generations", headers={"Authorization": "Bearer nope"})
    assert (r.status_code, r.json()) == (401, {"detail": "invalid bearer token"})
    r = client.post("/generations", json=request(digits_root), headers=READ)
    assert (r.status_code, r.json()) == (403, {"detail": "this token may only read"})
    assert client.get("/generations", headers=READ).json() == {"data": [], "count": 0}
    assert client.get("/healthz").json() == {"status": "ok", "problems": {}}


def test_create_queues_a_chain_with_links(client, digits_root):
    r = client.post("/generations", json=request(digits_root, iterations=3), headers=WRITE)
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/generations/{body['id']}" and len(body["chain"]) == 3
    first, second, third = (client.get(f"/generations/{g}", headers=READ).json() for g in body["chain"])
    # The first may have moved on to its teacher job, recorded before Ray (down here) is asked to run it.
    assert first["stage"] in ("queued", "training_teacher") and second["stage"] == third["stage"] == "queued"
    assert (first["parent_id"], second["parent_id"], third["parent_id"]) == (None, first["id"], second["id"])
    assert first["spec"]["labeled"] == str(digits_root / "labeled") and first["spec"]["teacher"] is None
    assert first["output"].endswith(f"/generations/{first['id']}")
    listing = client.get("/generations?limit=2", headers=READ).json()
    assert listing["count"] == 3 and len(listing["data"]) == 2
    queued = client.get("/generations?stage=queued&offset=1", headers=READ).json()
    started = client.get("/generations?stage=training_teacher", headers=READ).json()
    assert queued["count"] >= 2 and len(queued["data"]) == queued["count"] - 1
    assert queued["count"] + started["count"] == 3


def test_idempotency_key_replays_and_refuses_a_different_body(client, digits_root):
    key = {"Idempotency-Key": "retry-42", **WRITE}
    a = client.post("/generations", json=request(digits_root), headers=key)
    b = client.post("/generations", json=request(digits_root), headers=key)
    assert a.status_code == b.status_code == 202 and a.json() == b.json()
    assert client.get("/generations", headers=READ).json()["count"] == 1
    c = client.post("/generations", json=request(digits_root, iterations=2), headers=key)
    assert c.status_code == 409 and "different request" in c.json()["detail"]


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"labeled": "/etc"}, "labeled", "/etc is not under an allowed source root"),
        ({"unlabeled": "{root}/../../../etc/passwd"}, "unlabeled", "is not under an allowed source root"),
        ({"eval": "s3://someone-elses-bucket/x"}, "eval", "is not under an allowed source root"),
        ({"unlabeled": "{root}/missing"}, "unlabeled", "does not exist"),
        ({"validation": "/etc"}, "validation", "/etc is not under an allowed source root"),
        ({"validation": "{root}/unlabeled"}, "validation", "is not an ImageFolder"),
        ({"labeled": "{root}/unlabeled"}, "labeled", "is not an ImageFolder"),
        ({"labeled": "{root}/empty"}, "labeled", "is not an ImageFolder"),
        ({"teacher": "g-0123456789abcdef"}, "teacher", "no generation g-0123456789abcdef"),
        ({"teacher": "{root}/labeled"}, "teacher", "is not a model folder"),
    ],
)
def test_bad_sources_are_422_naming_the_field_before_anything_runs(client, digits_root, change, field, message):
    (digits_root / "empty").mkdir(exist_ok=True)
    body = request(digits_root, **{k: v.format(root=digits_root) for k, v in change.items()})
    r = client.post("/generations", json=body, headers=WRITE)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", field] and message in error["msg"]
    assert client.get("/generations", headers=READ).json()["count"] == 0


@pytest.mark.parametrize(
    "change, loc",
    [
        ({"student": {"architecture": "no_such_net"}}, ["body", "student", "architecture"]),
        ({"iterations": 0}, ["body", "iterations"]),
        ({"curation": {"confidence_floor": 1.5}}, ["body", "curation", "confidence_floor"]),
        ({"surprise": 1}, ["body", "surprise"]),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, digits_root, change, loc):
    r = client.post("/generations", json=request(digits_root, **change), headers=WRITE)
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [loc]


def test_ids_are_validated_and_unknown_ones_are_404(client):
    r = client.get("/generations/../../etc", headers=READ)
    assert r.status_code == 404
    r = client.get("/generations/g-XYZ", headers=READ)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "generation_id"]
    r = client.get("/generations/g-0123456789abcdef", headers=READ)
    assert (r.status_code, r.json()) == (404, {"detail": "no generation g-0123456789abcdef"})
    assert client.get("/datasets/d-0123456789abcdef", headers=READ).status_code == 404
    assert client.get("/generations/g-0123456789abcdef/model", headers=READ).status_code == 404


def test_cancel_a_queued_chain(client, digits_root):
    chain = client.post("/generations", json=request(digits_root, iterations=2), headers=WRITE).json()["chain"]
    r = client.post(f"/generations/{chain[0]}/cancel", headers=WRITE)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    deadline = time.time() + 30
    while time.time() < deadline:
        stages = [client.get(f"/generations/{g}", headers=READ).json()["stage"] for g in chain]
        if stages == ["cancelled", "cancelled"]:
            break
        time.sleep(0.2)
    assert stages == ["cancelled", "cancelled"]
    second = client.get(f"/generations/{chain[1]}", headers=READ).json()
    assert second["error"] == f"teacher generation {chain[0]} cancelled"
    r = client.post(f"/generations/{chain[0]}/cancel", headers=WRITE)
    assert (r.status_code, r.json()) == (409, {"detail": f"generation {chain[0]} already cancelled"})

    # A cancelled chain can go again, from its first generation; Ray is down, so it stays queued.
    assert client.post(f"/generations/{chain[0]}/retry", headers=READ).status_code == 403
    r = client.post(f"/generations/{chain[0]}/retry", headers=WRITE)
    assert r.status_code == 202 and (r.json()["stage"], r.json()["retries"], r.json()["error"]) == ("queued", 1, None)
    assert client.get(f"/generations/{chain[1]}", headers=READ).json()["stage"] == "queued"
    again = client.post(f"/generations/{chain[0]}/retry", headers=WRITE)
    assert again.status_code == 202 and again.json()["retries"] == 1  # the same retry, no new one


def test_retry_refuses_what_has_not_failed(client, digits_root):
    gid = client.post("/generations", json=request(digits_root), headers=WRITE).json()["id"]
    r = client.post(f"/generations/{gid}/retry", headers=WRITE)
    assert (r.status_code, r.json()) == (
        409,
        {"detail": f"generation {gid} is queued: only a failed or cancelled one can be retried"},
    )
    assert client.post("/generations/g-0123456789abcdef/retry", headers=WRITE).status_code == 404


def test_readiness_names_what_is_down_and_metrics_are_exposed(client):
    r = client.get("/readyz")
    assert r.status_code == 503 and set(r.json()["problems"]) == {"ray"}
    client.get("/generations", headers=READ)
    text = client.get("/metrics").text
    assert 'nstudent_http_request_seconds_count{method="GET",route="/generations",status="200"}' in text
    assert "nstudent_generations{stage=" in text


def test_a_chain_may_give_each_generation_its_own_student(client, digits_root):
    """The paper's students grow: `students` gives one config per generation, and must give as many as
    iterations."""
    students = [{"architecture": "test_resnet", "steps": 10}, {"architecture": "resnet18", "steps": 20}]
    r = client.post("/generations", json=request(digits_root, iterations=2, students=students), headers=WRITE)
    assert r.status_code == 202, r.text
    specs = [client.get(f"/generations/{g}", headers=READ).json()["spec"] for g in r.json()["chain"]]
    assert [(s["student"]["architecture"], s["student"]["steps"]) for s in specs] == [
        ("test_resnet", 10),
        ("resnet18", 20),
    ]
    assert all("students" not in s for s in specs)
    r = client.post("/generations", json=request(digits_root, iterations=3, students=students), headers=WRITE)
    assert r.status_code == 422 and "students: 2 configs for 3 iterations" in r.text


def test_init_from_must_be_a_readable_model_folder(client, digits_root):
    """A student may start from a model folder; one outside the allowed roots is refused at once."""
    body = request(digits_root, student={"architecture": "test_resnet", "init_from": "/etc"})
    r = client.post("/generations", json=body, headers=WRITE)
    assert r.status_code == 422 and "/etc is not under an allowed source root" in r.text
    body = request(digits_root, student={"architecture": "test_resnet", "init_from": str(digits_root / "gone")})
    assert "does not exist" in client.post("/generations", json=body, headers=WRITE).text
