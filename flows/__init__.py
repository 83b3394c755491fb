"""slipstream's flows: the stories a researcher tells, each runnable from the Prefect UI, on a
schedule, from an event, or as a plain Python call.

Importing them sets quiet, patient defaults for a Prefect *temporary* server (the one Prefect
starts when no server is configured), unless you set them yourself: no anonymous telemetry
(which fails noisily without internet), and up to 120 s for its first start, which migrates a
new database (Prefect's 20 s is too short on a busy machine). It also marks this process so
that a temporary server left behind by a killed flow can be found (``slipstream local reset``).
"""

import os

from slipstream.temporary_servers import mark_this_process

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
mark_this_process()
