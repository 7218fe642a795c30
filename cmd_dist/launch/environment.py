"""Ray's environment defaults, set when this module is first imported: before Ray is.

Ray reads these when it is imported or started. Every module of cmd_dist/launch that imports Ray imports this
module first (above an ``# isort: split`` line, so no import sorter moves ``import ray`` above it), and so does
``tune/driver.py``: whichever of them a program imports first, the defaults are in place before Ray is. They are
not set in ``cmd_dist/launch/__init__.py``, which every CLI command imports (``cmd-dist submit``'s parser lives in
this package): ``submit`` and ``report`` never start Ray here and keep the environment they were given.
"""

from __future__ import annotations

import os

# Ray's token authentication (every gRPC and HTTP request to the cluster carries its token): on for the local
# Ray, which Ray would enable by default anyway, and for joining a cluster (the token from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). RAY_AUTH_MODE=disabled in the environment is the only way to join a
# cluster that runs without it. Quiet defaults: no doubled prints, no usage-stats reporting.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller takes one report per health check (default every 2 s): short epochs would
# wait for it. 0.25 s halves `make demo` and changes nothing for CIFAR-sized epochs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
