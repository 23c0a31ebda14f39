"""``api_shim.asgi:application``: the server of log tails (api_shim/front.py), for granian's
ASGI interface; its worker ends when its master is gone, as the API's do (api_shim/wsgi.py)."""

import os

from api_shim.app import create_app
from api_shim.front import Front
from api_shim.server import when_orphaned

application = Front(create_app())
when_orphaned(os.getppid(), lambda: os._exit(0))
