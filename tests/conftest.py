import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster for the whole session (never attaches to, or stops, another one)."""
    import ray

    from service import cluster

    # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's deep tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="nst-ray-", dir="/tmp")
    os.environ.pop("RAY_ADDRESS", None)
    cluster.connect("local", num_cpus=2, temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """A real S3-speaking server (moto's) over HTTP on loopback for the whole session; yields its endpoint.

    Autouse, so the AWS variables are set before any local Ray cluster starts: Ray's workers take their
    environment from the raylet, which copies the test process's when the cluster starts. The credentials are
    dummies, so no test can reach a real bucket.
    """
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    from service import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    os.environ.update(env)
    storage._filesystem.cache_clear()
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._filesystem.cache_clear()
