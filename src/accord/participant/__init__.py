"""The participant SDK: run a service's handlers exactly once, in its own database.

A participant holds a *barrier* table next to its business tables. Each
operation of a global transaction (``try``, ``confirm``, ``cancel``,
``action``, ``compensate``) runs its handler inside one local transaction
together with the barrier row that records its answer, so that:

* a duplicate delivery never runs the handler again and gets the first answer;
* a cancel / compensate with nothing applied before it is a successful no-op
  (null compensation) and bars its try / action from ever applying later;
* confirm and cancel of one branch can never both apply;
* a :class:`Refusal` (business refusal) undoes the handler's changes but is
  recorded (for a try / action), any other exception undoes everything.

:class:`SQLiteBarrier` and :class:`PostgresBarrier` implement :class:`Barrier`;
:class:`Participant` serves the handlers over HTTP as an ASGI app that
verifies each request's signature (``accord.wire``).

The table (created by ``migrate()``)::

    accord_barrier(txid, branch, op, kind, result, error, created_at_ms,
                   PRIMARY KEY (txid, branch, op))

``kind`` is one of :class:`Kind`; ``result`` the JSON of the handler's result.
Rows must be kept at least :func:`retry_horizon_s` (plus the coordinator's
worst downtime): ``cleanup(older_than_s)`` refuses less than the barrier's
``min_retention_s`` (default :data:`DEFAULT_MIN_RETENTION_S`, 7 days).
"""

from accord.participant._app import Handler, Participant
from accord.participant._barrier import (
    DEFAULT_MIN_RETENTION_S,
    MAX_KEY_CHARS,
    MAX_RESULT_BYTES,
    Barrier,
    BarrierError,
    BarrierResult,
    Kind,
    Refusal,
    retry_horizon_s,
)
from accord.participant._postgres import PostgresBarrier
from accord.participant._sqlite import SQLiteBarrier

__all__ = [
    "DEFAULT_MIN_RETENTION_S",
    "MAX_KEY_CHARS",
    "MAX_RESULT_BYTES",
    "Barrier",
    "BarrierError",
    "BarrierResult",
    "Handler",
    "Kind",
    "Participant",
    "PostgresBarrier",
    "Refusal",
    "SQLiteBarrier",
    "retry_horizon_s",
]
