"""working_dir packages are per tenant and within a per-tenant budget (docs/api.md)."""

from __future__ import annotations

import dataclasses

from api_shim.app import App
from poolq.settings import Settings
from tests.wsgi import call

NAME = "/api/packages/gcs/_ray_pkg_0123456789abcdef.zip"
ZIP = b"PK\x05\x06" + b"\x00" * 18  # an empty zip


def put(app: App, tenant: str, data: bytes, name: str = NAME):  # type: ignore[no-untyped-def]
    return call(app, "PUT", name, raw=data, content_type=None, headers={"X-Tenant-Id": tenant})


def test_a_tenant_sees_and_replaces_only_its_own_packages(app: App) -> None:
    assert put(app, "team-a", ZIP).status == 200
    assert call(app, "GET", NAME, headers={"X-Tenant-Id": "team-a"}).status == 200
    assert call(app, "GET", NAME, headers={"X-Tenant-Id": "team-b"}).status == 404
    job = {"entrypoint": "true", "runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}}
    refused = call(app, "POST", "/api/jobs", job, headers={"X-Tenant-Id": "team-b"})
    assert refused.status == 400 and "runtime_env.working_dir" in refused.json["fields"]
    assert put(app, "team-b", ZIP + b"team-b's own").status == 200  # its own copy, not A's
    assert app.store.raw.get("poolq:pkg:team-a:_ray_pkg_0123456789abcdef.zip") == ZIP
    assert call(app, "POST", "/api/jobs", job, headers={"X-Tenant-Id": "team-a"}).status == 200


def test_a_tenants_packages_stay_within_its_budget(settings: Settings) -> None:
    app = App(dataclasses.replace(settings, max_tenant_package_bytes=100), waker=lambda queue: None)
    assert put(app, "team-a", b"x" * 60).status == 200
    assert put(app, "team-a", b"y" * 60).status == 200  # replacing a package frees what it held
    full = put(app, "team-a", b"z" * 60, name=NAME.replace("0123", "9999"))
    assert full.status == 413 and "package storage of tenant team-a is full" in full.json["error"]
    assert put(app, "team-b", b"z" * 60).status == 200  # another tenant's budget is its own
