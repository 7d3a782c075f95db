"""Every exception accord raises derives from :class:`AccordError`.

::

    AccordError
    ├── InvalidTransaction      a transaction spec broke a rule (names the field)
    ├── DuplicateTransaction    an id already taken by a different spec
    ├── TransactionNotFound     no transaction with that id in the log
    ├── StoreError              the durable log failed (retryable unless noted)
    │   ├── SchemaVersionError  the log was written by an incompatible version
    │   └── log.base.Fenced     a write refused: its shard's lease moved to another node
    ├── CoordinatorClosed       the coordinator is shut down or not started
    ├── Overloaded              in-flight limit reached and the caller chose not to wait
    ├── participant.Refusal     a participant's handler refuses (business refusal)
    └── participant.BarrierError  a participant's barrier table is inconsistent

Errors carry structured fields (``txid``, ``field``) and a ``retryable`` flag so
that callers can decide without parsing messages.
"""

from __future__ import annotations


class AccordError(Exception):
    """Root of accord's exceptions."""

    retryable: bool = False

    def __init__(self, message: str, *, txid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.txid = txid


class InvalidTransaction(AccordError, ValueError):
    """A transaction spec (or one of its branches) is not acceptable."""

    def __init__(self, field: str, message: str, *, txid: str | None = None) -> None:
        super().__init__(f"{field}: {message}", txid=txid)
        self.field = field


class DuplicateTransaction(AccordError):
    """The transaction id is already used by a transaction with a different spec."""


class TransactionNotFound(AccordError, KeyError):
    """No transaction with this id exists in the log."""

    def __str__(self) -> str:
        return self.message


class StoreError(AccordError):
    """The durable log could not be read or written."""

    retryable = True


class SchemaVersionError(StoreError):
    """The log's schema version is not one this build understands."""

    retryable = False


class CoordinatorClosed(AccordError):
    """The coordinator is not running."""


class Overloaded(AccordError):
    """Too many transactions in flight."""

    retryable = True
