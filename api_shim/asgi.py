"""``api_shim.asgi:application`` for granian's ASGI interface (settings from POOLQ_* variables)."""

from api_shim.app import create_app
from api_shim.front import Front

application = Front(create_app())
