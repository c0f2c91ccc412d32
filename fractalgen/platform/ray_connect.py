"""Connecting to Ray: a cluster's address, or a local Ray started for this process.

A local Ray starts its worker processes at niceness 15 by default (Ray's ``RAY_worker_niceness``),
which suits a shared head node but not a laptop or CI box where the run *is* the work: beside any
normal-priority process the training workers then get a few percent of a core. A local Ray started
here gives its workers the driver's own niceness instead, unless ``RAY_worker_niceness`` is set.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

WORKER_NICENESS_VAR = "RAY_worker_niceness"


def connect_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    Nothing happens if Ray is already initialised in this process. ``dashboard`` (training) starts
    the local Ray's dashboard on 127.0.0.1 and sends the workers' logs to the driver: Ray Train's
    placement-group cleaner asks the state API, which the dashboard serves, whether a run is alive;
    without it, it warns every second. Without ``dashboard`` (sweeps, generation) Ray stays quiet.
    """
    import ray  # deferred: heavy import # deferred: heavy, and `fractalgen --help` must start fast

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=dashboard)
        return
    os.environ.setdefault(WORKER_NICENESS_VAR, str(os.nice(0)))
    if dashboard:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
        if context.dashboard_url:
            log.info("local Ray dashboard: http://%s", context.dashboard_url)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
