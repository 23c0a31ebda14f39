"""The Celery app for Celery's own tools, built from the POOLQ_* environment:

    celery -A poolq.celery_app inspect ping      # every live placement worker and node agent
    celery -A poolq.celery_app events --dump     # task events, with POOLQ_TASK_EVENTS=1
    celery -A poolq.celery_app flower            # with Flower installed (docker-compose.yml)

It has no tasks of its own: Celery's tools ask the workers, and read the events they
send. poolq's processes build their apps with ``poolq.messaging.create_celery`` instead.
"""

from __future__ import annotations

from poolq.messaging import create_celery
from poolq.settings import ConfigError, Settings

try:
    app = create_celery(Settings.from_env())
except ConfigError as exc:  # one line for the user, not the traceback of Celery's loader
    raise SystemExit(f"poolq: {exc}") from None
# No connection pool: poolq's processes keep theirs small (4), but Flower runs its
# inspect commands in many threads at once, each holding a pooled connection while it
# waits for a producer from the same pool; with a bounded pool they (and Flower's
# event receiver, whose wake-up broadcast needs a producer too) wait forever, and
# Flower shows neither workers nor tasks. Unpooled, each use has a connection of its own.
app.conf.broker_pool_limit = None
