"""/api/packages/{protocol}/{name}: the working_dir uploads of Ray's SDK (DESIGN.md 2.6), per tenant."""

from __future__ import annotations

from api_shim.http import HTTPError, Request, Response
from api_shim.routes.jobs import tenant_of
from poolq import packages
from poolq.errors import InvalidRequest


def _name(request: Request) -> str:
    protocol, name = request.params["protocol"], request.params["name"]
    if not packages.valid(protocol, name):
        raise InvalidRequest({"name": ["must be gcs/_ray_pkg_<hash>.zip"]}, "invalid package name")
    return name


def head(request: Request) -> Response:
    name = _name(request)
    if not packages.exists(request.app.store.raw, tenant_of(request), name):
        raise HTTPError(404, f"package {name} does not exist")
    return Response.json({})


def put(request: Request) -> Response:
    # Ray's SDK sends the zip with no Content-Type: none is required here.
    name = _name(request)
    tenant = tenant_of(request)
    data = request.read_body(request.app.settings.max_package_bytes)
    if not data:
        raise InvalidRequest({"body": ["must be the package's zip bytes"]}, "empty package")
    settings, store = request.app.settings, request.app.store
    packages.put(store.raw, store.scripts, tenant, name, data, budget=settings.max_tenant_package_bytes)
    return Response.json({})
