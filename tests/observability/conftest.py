"""In-process participants for the observability tests: they record every
call, answer from a script, and can hold a call open until released."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from accord import BranchSpec, Call, Op, Outcome, Protocol, Reply, RetryPolicy, TransactionSpec

OK = Reply(Outcome.OK)
FAST = RetryPolicy(initial_interval_s=0.001, maximum_interval_s=0.005, maximum_attempts=5)


class Participant:
    """Answers ``answer(call)`` (OK by default) and records every call."""

    def __init__(self, answer: Callable[[Call], Reply] | None = None) -> None:
        self.answer = answer or (lambda call: OK)
        self.calls: list[Call] = []
        self.replies: list[Reply] = []
        self.held: asyncio.Future[None] | None = None

    def __call__(self, call: Call) -> Reply | asyncio.Future[Reply]:
        self.calls.append(call)
        reply = self.answer(call)
        self.replies.append(reply)
        if self.held is None:
            return reply
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.held.add_done_callback(lambda _: fut.set_result(reply))
        return fut

    def by_op_and_outcome(self) -> Counter[tuple[str, str]]:
        return Counter(
            (str(c.op), str(r.outcome)) for c, r in zip(self.calls, self.replies, strict=True)
        )


def fail_first(
    outcome: Outcome, times: int = 1, ops: tuple[Op, ...] = (Op.TRY, Op.ACTION)
) -> Callable[[Call], Reply]:
    """An answer: per transaction, ``outcome`` for the first ``times`` calls of
    a forward operation (try or action), then OK."""
    seen: Counter[str] = Counter()

    def answer(call: Call) -> Reply:
        if call.op in ops and seen[call.txid] < times:
            seen[call.txid] += 1
            return Reply(outcome, error=f"{outcome} from the test")
        return OK

    return answer


def tcc(txid: str, *participants: str) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.TCC,
        branches=tuple(BranchSpec(f"b{i}", p, {"i": i}, FAST) for i, p in enumerate(participants)),
        id=txid,
    )


def saga(txid: str, *participants: str) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.SAGA,
        branches=tuple(BranchSpec(f"s{i}", p, {"i": i}, FAST) for i, p in enumerate(participants)),
        id=txid,
    )
