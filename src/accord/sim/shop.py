"""The shop: the four services together, in memory or in their own files."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from accord.sim.faults import FaultConfig, FaultyService
from accord.sim.invariants import ServiceView
from accord.sim.services import RULES, Counters, Service, ServiceStore
from accord.sim.workload import SERVICES
from accord.transport.inprocess import InProcessTransport


class Shop:
    def __init__(self, services: dict[str, Service]) -> None:
        self.services = services
        self.fault_counts: Counter[str] = Counter()

    @classmethod
    def create(cls, initial: dict[str, Counters], directory: Path | None) -> Shop:
        """A fresh shop; with ``directory``, each service keeps a SQLite file there."""
        services = {}
        for name in SERVICES:
            store = None
            if directory is not None:
                store = ServiceStore(directory / f"{name}.db")
                store.create(initial[name])
            services[name] = Service(RULES[name](), initial[name], store=store)
        return cls(services)

    @classmethod
    def open(cls, directory: Path) -> Shop:
        """The shop of an earlier run, rebuilt from its files."""
        services = {}
        for name in SERVICES:
            path = directory / f"{name}.db"
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: not a shop directory")
            services[name] = Service.restore(RULES[name](), ServiceStore(path))
        return cls(services)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for service in self.services.values():
            if service.store is not None:
                service.store.start(loop)

    async def close(self) -> None:
        for service in self.services.values():
            await service.close()

    def transport(self, faults: FaultConfig, seed: int) -> InProcessTransport:
        handlers = {
            name: FaultyService(svc, faults, random.Random(f"{seed}:{name}"), self.fault_counts)
            for name, svc in self.services.items()
        }
        return InProcessTransport(handlers)

    def views(self) -> dict[str, ServiceView]:
        return {
            name: ServiceView(name, svc.initial, svc.ledger, svc.counters)
            for name, svc in self.services.items()
        }

    @property
    def duplicates_delivered(self) -> int:
        return sum(s.duplicates for s in self.services.values())
