"""Fault injection for the poison-job scenario: imported by a placement worker started as
``python -c "import tests.faults.poison; ..."`` before poolq starts.

``Scheduler._choose`` is wrapped so that the worker process dies on the spot
(``os._exit(1)``, as a segfault or an OOM kill would) whenever a round claimed a job
whose entrypoint holds MARKER. Each death is appended to the file named by
FAULTS_POISON_LOG, so the test can count them.
"""

from __future__ import annotations

import json
import os
import time

from poolq import keys
from poolq.model import JobFields
from worker import scheduler

MARKER = "poolq-faults-poison-pill"

_choose = scheduler.Scheduler._choose


def _poisoned_choose(self, jobs, failed_shapes):  # type: ignore[no-untyped-def]
    if jobs:
        pipe = self.redis.pipeline(transaction=False)
        for job_ref, _sig, _seq in jobs:
            pipe.hget(keys.job(job_ref), JobFields.SPEC)
        for (job_ref, _sig, _seq), spec in zip(jobs, pipe.execute()):
            if spec and MARKER in json.loads(spec).get("entrypoint", ""):
                log_path = os.environ.get("FAULTS_POISON_LOG")
                if log_path:
                    with open(log_path, "a") as handle:
                        handle.write(f"{time.time():.3f} {os.getpid()} {job_ref} with {len(jobs)} claimed\n")
                os._exit(1)
    return _choose(self, jobs, failed_shapes)


scheduler.Scheduler._choose = _poisoned_choose  # type: ignore[method-assign]
