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


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The bundled digits as image folders: 5 labeled and 10 test images a class, the rest unlabeled."""
    from service import digits

    root = tmp_path_factory.mktemp("digits")
    digits.write(str(root), labeled_per_class=5, test_per_class=10, validation_per_class=0)
    return root


@pytest.fixture(scope="session", autouse=True)
def s3_proxy():
    """A real S3-speaking server (moto's) over HTTP on loopback for the whole session, behind the fault proxy
    (``bench.s3proxy``, no faults unless a test asks: ``flaky_s3``); yields the proxy. The AWS variables point at
    the proxy, so every S3 request of the session, Ray workers' included, goes through it.

    Autouse, so the AWS variables are set before any local Ray cluster starts: Ray's workers take their
    environment from the raylet, which copies the test process's when the cluster starts (hence one proxy for
    the session whose faults change at run time, not a proxy per test). The credentials are dummies, so no test
    can reach a real bucket.
    """
    import logging

    from moto.server import ThreadedMotoServer

    from bench.s3proxy import FaultProxy
    from curation import storage
    from service import cluster

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = cluster.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(f"http://127.0.0.1:{port}").start()
    env = {
        "AWS_ENDPOINT_URL": proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    os.environ.update(env)
    storage._filesystem.cache_clear()
    yield proxy
    proxy.stop()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._filesystem.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def s3_server(s3_proxy):
    """The session's S3 endpoint (the proxy's: ``s3_proxy``), as AWS_ENDPOINT_URL holds it."""
    return s3_proxy.endpoint


@pytest.fixture
def flaky_s3(s3_proxy):
    """The session's S3 failing 10% of requests for this test: 503 SlowDown, 500 InternalError, connection
    resets, and GET answers cut half-way (2.5% each), drawn from a seeded generator; faults off again after.
    Yields the proxy: its ``counts`` say what was injected, ``set(...)`` changes the faults."""
    from bench.s3proxy import Faults

    s3_proxy.reset(Faults.mixed(0.10), seed=0)
    yield s3_proxy
    s3_proxy.reset()
