"""The coordinator as an HTTP service: ``accord serve``.

:func:`create_app` builds the ASGI app (REST API, OpenAPI document, health
checks) over a :class:`~accord.Coordinator`; see docs/api.md. The names are
imported on first use, so that the client (which shares the API's types in
:mod:`accord.server.schema`) does not load the server's framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accord.server.app import ServerConfig, create_app
    from accord.server.history import HistoryObserver
    from accord.server.limits import AllowList, Limits
    from accord.server.observers import FanOut

_WHERE = {
    "AllowList": "accord.server.limits",
    "FanOut": "accord.server.observers",
    "HistoryObserver": "accord.server.history",
    "Limits": "accord.server.limits",
    "ServerConfig": "accord.server.app",
    "create_app": "accord.server.app",
}

__all__ = ["AllowList", "FanOut", "HistoryObserver", "Limits", "ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'accord.server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
