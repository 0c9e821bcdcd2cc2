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
