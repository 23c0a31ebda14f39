"""poolq: a message-queue driven job submission service."""

__version__ = "0.1.0"
