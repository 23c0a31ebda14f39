"""``api_shim.asgi:application``: the server of log tails (api_shim/front.py), for granian's ASGI interface."""

from api_shim.app import create_app
from api_shim.front import Front

application = Front(create_app())
