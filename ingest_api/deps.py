"""Route dependencies as Annotated aliases; the app's lifespan fills app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.wiring import Services
from config.settings import Settings


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
