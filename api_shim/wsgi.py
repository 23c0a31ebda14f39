"""``api_shim.wsgi:application`` for any WSGI server (settings from POOLQ_* variables)."""

from api_shim.app import create_app

application = create_app()
