"""Canary traffic: a share of one model's requests answered by the version its ``canary`` alias
names, sticky by request id.

The share lives in the registry beside the aliases (``modelloop models traffic NAME
--canary-share 0.2``; :meth:`modelloop.registry.Registry.canary_share`), so it changes without
a restart: :mod:`serving.repository` reads it each time it polls the aliases. While the alias
names a version other than production and the share is above 0, the canary version is loaded
beside production with its own :class:`~serving.models.ModelManager` (so it swaps without
downtime when the alias moves) and its own batcher. A request goes to it when
:func:`canary_bucket` of its request id (``X-Request-ID``, the OIP ``id``, or the generated one)
is below the share: the same id always lands on the same version, in every worker.

Example::

    lane = served.route("req-42")   # production's or the canary's manager and batcher
    try:
        result = await lane.batcher.predict(lane.manager.current, x)
    finally:
        served.leave(lane)
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from serving.batcher import AdaptiveBatcher
from serving.models import ModelManager

ALIAS_CANARY = "canary"


def canary_bucket(request_id: str) -> float:
    """Where ``request_id`` falls in [0, 1): a hash, the same in every process (Python's
    ``hash`` of a string is salted per process, so it would not be sticky across workers)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Canary:
    """The canary version of one served model: its manager, its batcher, its share, and its
    requests in flight (so it is closed only after them)."""

    def __init__(self, manager: ModelManager, batcher: AdaptiveBatcher, share: float) -> None:
        self.manager = manager
        self.batcher = batcher
        self.share = share
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def version(self) -> int:
        return self.manager.current.model_version

    def enter(self) -> None:
        self.users += 1
        self.idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()

    async def close(self) -> None:
        """Stop after the requests already sent to it (the caller stopped routing to it)."""
        await self.idle.wait()
        await self.batcher.stop()
        await self.manager.close()


@dataclass(slots=True)
class Lane:
    """Where one request runs: production's or the canary's manager and batcher."""

    manager: ModelManager
    batcher: AdaptiveBatcher
    canary: Canary | None = None
    """The canary it was sent to (counted in flight until ``ServedModel.leave``), or None."""
