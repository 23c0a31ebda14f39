"""/api/packages/{protocol}/{name}: the working_dir uploads of Ray's SDK (docs/api.md), per tenant."""

from __future__ import annotations

from api_shim.http import HTTPError, Request, Response
from poolq import packages
from poolq.errors import InvalidRequest
from poolq.settings import Settings
from poolq.store import JobStore


class Packages:
    def __init__(self, store: JobStore, settings: Settings):
        self.store, self.settings = store, settings

    def head(self, request: Request) -> Response:
        name = _name(request)
        if not packages.exists(self.store.raw, request.tenant_or_400(), name):
            raise HTTPError(404, f"package {name} does not exist")
        return Response.json({})

    def put(self, request: Request) -> Response:
        # Ray's SDK sends the zip with no Content-Type: none is required here.
        name = _name(request)
        tenant = request.tenant_or_400()
        data = request.read_body(self.settings.max_package_bytes)
        if not data:
            raise InvalidRequest({"body": ["must be the package's zip bytes"]}, "empty package")
        budget = self.settings.max_tenant_package_bytes
        packages.put(self.store.raw, self.store.scripts, tenant, name, data, budget=budget)
        return Response.json({})


def _name(request: Request) -> str:
    protocol, name = request.params["protocol"], request.params["name"]
    if not packages.valid(protocol, name):
        raise InvalidRequest({"name": ["must be gcs/_ray_pkg_<hash>.zip"]}, "invalid package name")
    return name
