"""What a job may read, checked at the read itself: every refusal and its reason, the first that applies."""

from __future__ import annotations

import os

import pytest

from curation.access import ReadPolicy, Refused, normalize


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "ok.png").write_bytes(b"\x89PNG" + b"\0" * 100)
    (r / "big.bin").write_bytes(b"x" * 2048)
    os.mkfifo(r / "fifo.png")
    os.symlink("/etc/hostname", r / "escape.png")
    (r / "folder.png").mkdir()
    return r


def reason(policy: ReadPolicy, uri: str) -> str:
    with pytest.raises(Refused) as e:
        policy.read(uri)
    return e.value.reason


def test_each_refusal_has_its_reason(root):
    policy = ReadPolicy(roots=(normalize(str(root)),), max_bytes=1024)
    assert policy.read(str(root / "ok.png")).startswith(b"\x89PNG")
    assert reason(policy, "/etc/shadow") == "outside_roots"
    assert reason(policy, "/proc/self/environ") == "outside_roots"
    assert reason(policy, "file:///etc/hostname") == "outside_roots"
    assert reason(policy, str(root / "escape.png")) == "outside_roots"  # a symlink out of the root
    assert reason(policy, f"{root}/../root/../../etc/passwd") == "outside_roots"
    assert reason(policy, "s3://another-bucket/x.png") == "outside_roots"
    assert reason(policy, "s3://victim/../allowed/x.png") == "outside_roots"
    assert reason(policy, str(root / "fifo.png")) == "not_regular_file"  # and it does not hang
    assert reason(policy, str(root / "folder.png")) == "not_regular_file"
    assert reason(policy, str(root / "big.bin")) == "too_large"
    with pytest.raises(FileNotFoundError):
        policy.read(str(root / "missing.png"))


def test_devices_are_refused_even_without_roots(root):
    anywhere = ReadPolicy(max_bytes=1024)
    assert reason(anywhere, "/dev/zero") == "not_regular_file"  # would read until memory runs out
    assert reason(anywhere, "/dev/null") == "not_regular_file"
    assert anywhere.read(str(root / "escape.png")) == open("/etc/hostname", "rb").read()


def test_the_first_reason_wins(root):
    policy = ReadPolicy(roots=(normalize(str(root / "ok.png")),), max_bytes=1)
    # A FIFO outside the roots: outside_roots, never opened; a regular file over the cap inside: too_large.
    assert reason(policy, str(root / "fifo.png")) == "outside_roots"
    assert reason(policy, str(root / "ok.png")) == "too_large"
