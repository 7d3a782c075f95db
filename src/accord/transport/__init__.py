"""How the coordinator reaches participants."""

from accord.transport.base import Call, Reply, Transport
from accord.transport.inprocess import InProcessTransport

__all__ = ["Call", "InProcessTransport", "Reply", "Transport"]
