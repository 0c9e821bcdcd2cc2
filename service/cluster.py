"""Connecting to Ray: an existing cluster (RAY_ADDRESS or an explicit address) or a private local one."""

from __future__ import annotations

import logging
import os

import ray

# Ray Data and Ray Train log every operator and report; the CLI shows its own progress instead.
QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune")


def connect(
    address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None, quiet: bool = True
) -> None:
    """Attach to ``address`` (or RAY_ADDRESS), or start a local cluster that belongs to this process.

    ``address="local"`` always starts a new cluster, never attaching to one already running on the machine.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {}
    if address == "local":
        kwargs = {"num_cpus": num_cpus, "_temp_dir": temp_dir}
    ray.init(
        address=address,
        include_dashboard=False if address == "local" else None,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
        configure_logging=True,
        **kwargs,
    )
    if quiet:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
