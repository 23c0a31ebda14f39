"""``api_shim.wsgi:application`` for any WSGI server (settings from POOLQ_* variables).

A worker process that imports it ends when its server's master is gone (kill -9 included),
instead of holding the API's port for nobody."""

import os

from api_shim.app import create_app
from api_shim.server import when_orphaned

application = create_app()
when_orphaned(os.getppid(), lambda: os._exit(0))
