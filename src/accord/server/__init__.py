"""The coordinator as an HTTP service: ``accord serve``.

:func:`create_app` builds the ASGI app (REST API, OpenAPI document, health
checks) over a :class:`~accord.Coordinator`; see docs/api.md.
"""

from accord.server.app import ServerConfig, create_app
from accord.server.history import HistoryObserver
from accord.server.limits import AllowList, Limits
from accord.server.observers import FanOut

__all__ = ["AllowList", "FanOut", "HistoryObserver", "Limits", "ServerConfig", "create_app"]
