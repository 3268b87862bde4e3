"""Route dependencies as Annotated aliases; the app's lifespan fills app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.wiring import Services
from config.settings import Settings
from ingest_api.health import Health
from ingest_api.reads import ReadPool


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_reads(request: Request) -> ReadPool:
    reads: ReadPool = request.app.state.reads
    return reads


async def get_health(request: Request) -> Health:
    health: Health = request.app.state.health
    return health


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ReadsDep = Annotated[ReadPool, Depends(get_reads)]
HealthDep = Annotated[Health, Depends(get_health)]
