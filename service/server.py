"""``nstudent serve``: wire the settings, the Ray cluster, the store and the API together, and run uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn

from api.app import create_app
from service import cluster, redact
from service.control import ControlPlane
from service.jobs import Jobs
from service.principals import api_principals
from service.settings import Settings
from service.store import Store


def run(settings: Settings, log: Callable[[str], None] = print) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact.install()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    principals, token_file = api_principals(settings)
    if token_file is not None:
        log(f"no API tokens configured: a read-write token is in {token_file}")
    head = None
    if settings.ray_address:
        token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
        jobs = Jobs(settings.ray_address, token, env=settings.job_env())
        log(f"Ray Jobs API at {redact.redact(settings.ray_address)}")
    else:
        log(f"starting a local Ray head under {settings.data_dir / 'ray'}")
        head = cluster.start_head(
            settings.data_dir / "ray", num_cpus=settings.ray_num_cpus, num_gpus=settings.ray_num_gpus
        )
        log(f"Ray dashboard and Jobs API at {head.dashboard_url}")
        jobs = Jobs(head.dashboard_url, head.token, env=settings.job_env())
    control = ControlPlane(settings, Store(settings.database), jobs, principals)
    if head is not None:
        # A clean stop (SIGTERM, Ctrl-C) takes the local head down with it, its jobs first; after a crash the
        # head and its jobs keep running and the next start reuses them. This runs in the app's shutdown,
        # because uvicorn re-raises the signal once it has shut down: code after uvicorn.run never runs.
        def stop_local_head() -> None:
            jobs.stop_all()
            cluster.stop_head(head)

        control.on_stop.append(stop_local_head)
    # No access log: GET /metrics counts and times every request by route and status instead.
    uvicorn.run(
        create_app(control), host=settings.host, port=settings.port, log_level="info", access_log=False, log_config=None
    )  # keep the root logger's handlers, and their redaction
