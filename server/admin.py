"""Admin routes (admin key): load, unload and pin expert sets while serving; slot status; the
registry's pull/push routes (`expertlib.server.registry_routes`), mounted under /admin/registry."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request

from expertlib.server.auth import check_admin_key
from expertlib.server.catalog_view import admin_status
from expertlib.server.protocol import AdminStatus, LoadRequest, NameRequest, PinRequest, SetStatus
from expertlib.server.state import ServerState

log = logging.getLogger("expertlib.server")

router = APIRouter(prefix="/admin", dependencies=[Depends(check_admin_key)])


def state_of(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/status", response_model=AdminStatus)
async def status(request: Request) -> AdminStatus:
    return admin_status(state_of(request))


@router.post("/sets/load", response_model=SetStatus)
async def load(body: LoadRequest, request: Request) -> SetStatus:
    state = state_of(request)
    _, catalog = state.require_ready()
    name = await catalog.load(body.name, pin=body.pin)
    state.refresh_metrics()
    return SetStatus(name=name, pinned=body.pin)


@router.post("/sets/unload", response_model=SetStatus)
async def unload(body: NameRequest, request: Request) -> SetStatus:
    state = state_of(request)
    _, catalog = state.require_ready()
    name = await catalog.unload(body.name)
    state.refresh_metrics()
    return SetStatus(name=name, loaded=False)


@router.post("/sets/pin", response_model=SetStatus)
async def pin(body: PinRequest, request: Request) -> SetStatus:
    _, catalog = state_of(request).require_ready()
    name = await catalog.pin(body.name, body.pinned)
    return SetStatus(name=name, pinned=body.pinned)


def registry_router() -> APIRouter | None:
    """The registry's HTTP routes under the admin key, or None when that module is not there."""
    try:
        from expertlib.server.registry_routes import router as reg_router
    except ImportError as exc:
        log.info("registry HTTP routes not available: %s", exc)
        return None
    wrapper = APIRouter(prefix="/admin/registry", dependencies=[Depends(check_admin_key)])
    wrapper.include_router(reg_router)
    return wrapper
