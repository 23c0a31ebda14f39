"""poolq's errors. The HTTP shim turns each into one response in exactly one place.

PoolqError
├── InvalidRequest   a request or message breaks the contract (400, with fields)
├── NotFound         no such job in the caller's tenant (404)
├── Conflict         the request contradicts stored state (409)
├── TooMany          a tenant limit: max pending jobs, request rate (429)
├── StorageFull      a tenant's packages would exceed its package budget (413)
└── Unavailable      Redis cannot be reached or refuses writes (503)
"""

from __future__ import annotations


class PoolqError(Exception):
    """Root of every error poolq raises on purpose."""


class InvalidRequest(PoolqError):
    """A job request or message that breaks the contract; ``fields`` names each problem."""

    def __init__(self, fields: dict[str, list[str]], message: str = "invalid job request"):
        super().__init__(message)
        self.fields = fields


class NotFound(PoolqError):
    """The job does not exist in the caller's tenant."""


class Conflict(PoolqError):
    """The request contradicts what is stored (a different job under the same id, a live job deleted)."""


class TooMany(PoolqError):
    """A tenant limit was reached: its max pending jobs, or its request rate (``retry_after`` s)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class StorageFull(PoolqError):
    """A tenant's stored packages would exceed its package budget."""


class Unavailable(PoolqError):
    """Redis cannot be reached, timed out, or refuses writes; ``submission_id`` names the
    job of a submission whose outcome the caller must resolve by sending it again."""

    def __init__(self, message: str, submission_id: str | None = None):
        super().__init__(message)
        self.submission_id = submission_id
