"""The ``poolq`` commands: the one place that may import every part of poolq.

The shared core (the rest of ``poolq``) imports neither edge, ``api_shim`` and
``worker`` import the core and never each other, and these commands put them
together (``make lint`` checks it: the import contracts in pyproject.toml).
"""
