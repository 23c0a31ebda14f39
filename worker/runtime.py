"""What a worker process's tasks work with: its settings and the objects built from them.

``poolq worker`` and ``poolq node`` call ``configure`` before Celery starts; tasks
then reach the scheduler, the store or the node agent through this module.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import JobStore

if TYPE_CHECKING:
    from worker.agent import Agent
    from worker.scheduler import Scheduler

_settings: Settings | None = None
_agent: Agent | None = None


def configure(settings: Settings) -> None:
    global _settings
    _settings = settings
    store.cache_clear()
    scheduler.cache_clear()


def settings() -> Settings:
    if _settings is None:
        configure(Settings.from_env())
    assert _settings is not None
    return _settings


@functools.cache
def store() -> JobStore:
    from worker.celery_app import celery_waker

    return JobStore(connect(settings()), settings(), celery_waker(settings()))


@functools.cache
def scheduler() -> Scheduler:
    from worker.scheduler import Scheduler

    return Scheduler(store())


def set_agent(agent: Agent) -> None:
    global _agent
    _agent = agent


def agent() -> Agent | None:
    return _agent
