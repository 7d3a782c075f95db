"""How the coordinator reaches participants."""

from accord.transport.base import Call, Reply, Transport
from accord.transport.http import HttpTransport
from accord.transport.inprocess import InProcessTransport

__all__ = ["Call", "HttpTransport", "InProcessTransport", "Reply", "Transport"]
