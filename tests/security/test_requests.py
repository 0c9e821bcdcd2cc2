"""Hostile requests against the API in process (real SQLite store, Ray down): each attack and its refusal."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.control import ControlPlane
from service.jobs import Jobs
from service.principals import Principals, Role
from service.settings import Settings
from service.store import Store
from tests.api.conftest import RAY_DOWN

TEAM_A, TEAM_B = {"Authorization": "Bearer a-token"}, {"Authorization": "Bearer b-token"}
ADMIN, OLD = {"Authorization": "Bearer admin-token"}, {"Authorization": "Bearer plain-token"}
READER_A = {"Authorization": "Bearer a-reader"}


@pytest.fixture
def world(tmp_path, digits_root):
    own = tmp_path / "team-a-data"
    own.mkdir()
    settings = Settings(
        data_dir=tmp_path / "data",
        source_roots=[str(digits_root)],
        poll_seconds=60,
        principal_roots={"team-a": [str(own)]},
    )
    principals = Principals()
    principals.add("team-a:a-token", Role.WRITE, settings.principal_roots)
    principals.add("team-a:a-reader", Role.READ, settings.principal_roots)
    principals.add("team-b:b-token", Role.WRITE, settings.principal_roots)
    principals.add("ops:admin-token", Role.ADMIN)
    principals.add("plain-token", Role.WRITE)  # an old, unnamed token: the principal `default`
    control = ControlPlane(settings, Store(settings.database), Jobs(RAY_DOWN, timeout=1), principals)
    with TestClient(create_app(control)) as client:
        client.own_root = own
        client.control = control
        yield client


def body(root, **kw) -> dict:
    return {"labeled": str(root / "labeled"), "unlabeled": str(root / "unlabeled"), "eval": str(root / "test"), **kw}


def loc(r) -> list:
    return [e["loc"] for e in r.json()["detail"]]


def test_a_body_over_1_mib_is_413_before_it_is_read(world, digits_root):
    huge = body(digits_root, student={"model_kwargs": {"global_pool": "avg" * 10_000_000}})
    r = world.post("/generations", content=json.dumps(huge), headers={**TEAM_A, "content-type": "application/json"})
    assert (r.status_code, r.json()) == (413, {"detail": "the request body is over 1048576 bytes"})

    def chunks():  # no Content-Length: the body streams in, and is cut off once it passes the cap
        yield b'{"labeled": "'
        for _ in range(300):
            yield b"x" * 8192
        yield b'"}'

    r = world.post("/generations", content=chunks(), headers={**TEAM_A, "content-type": "application/json"})
    assert r.status_code == 413
    assert world.get("/generations", headers=ADMIN).json()["count"] == 0


@pytest.mark.parametrize(
    "field, value, where",
    [
        ("student", {"lr": float("nan")}, ["body", "student", "lr"]),
        ("student", {"temperature": float("inf")}, ["body", "student", "temperature"]),
        ("student", {"unlabeled_ratio": float("-inf")}, ["body", "student", "unlabeled_ratio"]),
        ("student", {"mean": [0.1, float("nan"), 0.1]}, ["body", "student", "mean", 1]),
        ("curation", {"confidence_floor": float("nan")}, ["body", "curation", "confidence_floor"]),
        ("student", {"seed": 2**70}, ["body", "student", "seed"]),
        ("student", {"input_size": 10**6}, ["body", "student", "input_size"]),
        ("student", {"workers": 100_000}, ["body", "student", "workers"]),
        ("label", {"shard_rows": 10**15}, ["body", "label", "shard_rows"]),
        ("student", {"model_kwargs": {"checkpoint_path": "/outside/w.pth"}}, ["body", "student", "model_kwargs"]),
        ("student", {"model_kwargs": {"pretrained": True}}, ["body", "student", "model_kwargs"]),
        ("student", {"model_kwargs": {"global_pool": "../../etc/passwd"}}, ["body", "student", "model_kwargs"]),
    ],
)
def test_non_finite_huge_and_unsafe_fields_are_422(world, digits_root, field, value, where):
    r = world.post(
        "/generations",
        content=json.dumps(body(digits_root, **{field: value})),
        headers={**TEAM_A, "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert where in loc(r)


@pytest.mark.parametrize(
    "raw, field",
    [
        ('"/data/\\u0000/x"', "labeled"),
        ('"/data/\\ud800x"', "labeled"),
        ('"s3://victim/../allowed/pool"', "unlabeled"),
        ('"file:///etc/hostname"', "eval"),
        ('"gs://other/bucket"', "labeled"),
    ],
)
def test_bad_paths_are_422_never_500(world, digits_root, raw, field):
    fields = {k: json.dumps(v) for k, v in body(digits_root).items()}
    fields[field] = raw
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    r = world.post("/generations", content=text, headers={**TEAM_A, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert ["body", field] == loc(r)[0][:2]


def test_a_symlink_then_dot_dots_is_checked_and_stored_as_resolved(world, digits_root, tmp_path):
    # root/latest points inside the root; root/latest/../../.. would leave the root by text, not by resolution.
    inner = digits_root / "deep" / "a" / "b"
    inner.mkdir(parents=True, exist_ok=True)
    link = digits_root / "latest"
    if not link.exists():
        os.symlink(inner, link)
    escape = f"{link}/../../../../../../../../etc/ssl"
    r = world.post("/generations", json=body(digits_root, unlabeled=escape), headers=TEAM_A)
    assert r.status_code == 422 and loc(r) == [["body", "unlabeled"]]
    # Through the link and back down into the root: allowed, and stored as the path that was checked.
    ok = f"{link}/../../../unlabeled"
    r = world.post("/generations", json=body(digits_root, unlabeled=ok), headers=TEAM_A)
    assert r.status_code == 202, r.text
    g = world.get(f"/generations/{r.json()['id']}", headers=TEAM_A).json()
    assert g["spec"]["unlabeled"] == str((digits_root / "unlabeled").resolve())
    assert g["spec"]["roots"] == [str(digits_root), str(world.control.settings.allowed_roots[-1]), str(world.own_root)]


def test_principals_see_only_their_own_and_others_get_404(world, digits_root):
    a = world.post("/generations", json=body(digits_root), headers={**TEAM_A, "Idempotency-Key": "k"}).json()["id"]
    b = world.post("/generations", json=body(digits_root), headers={**TEAM_B, "Idempotency-Key": "k"}).json()["id"]
    assert a != b  # the same key, two principals: two generations
    assert world.get(f"/generations/{a}", headers=TEAM_A).json()["created_by"] == "team-a"
    for path in (f"/generations/{a}", f"/generations/{a}/model"):
        r = world.get(path, headers=TEAM_B)
        assert (r.status_code, r.json()) == (404, {"detail": f"no generation {a}"})
    for action in ("cancel", "retry"):
        assert world.post(f"/generations/{a}/{action}", headers=TEAM_B).status_code == 404
    assert [g["id"] for g in world.get("/generations", headers=TEAM_B).json()["data"]] == [b]
    assert {g["id"] for g in world.get("/generations", headers=ADMIN).json()["data"]} == {a, b}
    assert {g["id"] for g in world.get("/generations", headers=OLD).json()["data"]} == {a, b}  # `default`
    assert world.get(f"/generations/{a}", headers=READER_A).status_code == 200
    assert world.post(f"/generations/{a}/cancel", headers=READER_A).status_code == 403
    # A teacher given as another principal's generation does not exist for this one.
    r = world.post("/generations", json=body(digits_root, teacher=a), headers=TEAM_B)
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == f"no generation {a}"

    assert world.post(f"/generations/{a}/cancel", headers=TEAM_A).status_code == 202
    assert world.get("/audit", headers=TEAM_A).status_code == 403
    log = world.get("/audit", headers=ADMIN).json()
    assert [(e["principal"], e["action"], e["target"]) for e in log["data"]] == [
        ("team-a", "cancel", a),
        ("team-b", "create", b),
        ("team-a", "create", a),
    ]


def test_a_principal_reads_from_its_own_roots_and_no_one_elses(world, digits_root):
    import shutil

    shutil.copytree(digits_root / "unlabeled", world.own_root / "pool", dirs_exist_ok=True)
    own_pool = str(world.own_root / "pool")
    assert world.post("/generations", json=body(digits_root, unlabeled=own_pool), headers=TEAM_A).status_code == 202
    r = world.post("/generations", json=body(digits_root, unlabeled=own_pool), headers=TEAM_B)
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == f"{own_pool} is not under an allowed source root"


def test_malformed_tokens_are_refused_at_start():
    with pytest.raises(ValueError, match="a token is `name:token`"):
        Principals().add("Team A:tok", Role.READ)
    p = Principals()
    p.add("x:tok", Role.READ)
    with pytest.raises(ValueError, match="one token is given to two principals"):
        p.add("y:tok", Role.WRITE)


def test_credentials_in_urls_never_reach_a_response_or_a_log_line(tmp_path, caplog):
    import logging

    from service import redact

    settings = Settings(data_dir=tmp_path / "data")
    principals = Principals()
    principals.add("w", Role.WRITE)
    jobs = Jobs("http://admin:hunter2@127.0.0.1:9/?token=abc", timeout=1)
    control = ControlPlane(settings, Store(settings.database), jobs, principals)
    with TestClient(create_app(control)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and "hunter2" not in r.text and "abc" not in r.text
    assert "http://***@127.0.0.1:9" in r.json()["problems"]["ray"]

    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        redact.install()
        with caplog.at_level(logging.WARNING):
            logging.getLogger("nstudent.test").warning("cannot reach %s", "postgresql+psycopg://u:pw@db:5432/x")
        assert handler.filters and "pw@" not in handler.format(caplog.records[-1])
    finally:
        logging.getLogger().removeHandler(handler)
    assert redact.redact("s3://bucket/key?X-Amz-Signature=deadbeef&x=1") == "s3://bucket/key?X-Amz-Signature=***&x=1"


def test_a_teachers_model_json_may_not_name_paths_or_downloads(tmp_path):
    from trainer.meta import ModelMeta

    base = {"architecture": "test_resnet", "class_names": ["a", "b"], "input_size": 32}
    for kwargs in ({"checkpoint_path": "/outside/w.pth"}, {"pretrained": True}, {"pretrained_cfg": {"file": "/x"}}):
        with pytest.raises(ValueError, match="is not allowed"):
            ModelMeta.model_validate({**base, "model_kwargs": kwargs})
    assert ModelMeta.model_validate({**base, "model_kwargs": {"global_pool": "avg"}}).model_kwargs


def test_the_local_head_keeps_its_token_and_record_private(tmp_path):
    import stat

    from service import cluster

    state = tmp_path / "ray"
    head = cluster.start_head(state, num_cpus=1)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("head.json", "token"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert head.token in (state / "head.json").read_text()
    finally:
        cluster.stop_head(head)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
