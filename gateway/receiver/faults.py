"""Test fault injection: make the next N posted bundles fail the way a real registry can fail.

Only for tests and demos (enabled with `create_receiver_app(..., test_faults=True)` or `serve --test-faults`);
a fault answers before the bundle is parsed or stored, like a registry that is down or throttling.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from gateway.outcome import FhirError, Issue


@dataclass
class Fault:
    status: int | None  # None: no error, only the delay
    remaining: int
    retry_after: str | None = None
    delay: float = 0.0
    diagnostics: str = "test fault injection"

    def error(self) -> FhirError:
        code = {
            400: "invalid",
            401: "login",
            403: "forbidden",
            408: "timeout",
            422: "processing",
            429: "throttled",
        }.get(self.status or 0, "transient")
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        return FhirError(self.status or 500, [Issue(code, self.diagnostics)], headers=headers)


class FaultPlan:
    """A queue of faults; each posted bundle consumes one use of the first fault in line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, spec: dict[str, Any]) -> None:
        status = spec.get("status")
        count = spec.get("count", 1)
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise FhirError.single(400, "value", "status must be an HTTP error status (400-599)", "status")
        if not isinstance(count, int) or count < 1:
            raise FhirError.single(400, "value", "count must be a positive integer", "count")
        delay = spec.get("delay", 0.0)
        if not isinstance(delay, int | float) or not 0 <= delay <= 300:
            raise FhirError.single(400, "value", "delay must be 0..300 seconds", "delay")
        retry_after = spec.get("retry_after")
        fault = Fault(
            status,
            count,
            None if retry_after is None else str(retry_after),
            float(delay),
            str(spec.get("diagnostics") or "test fault injection")[:500],
        )
        with self._lock:
            self._faults.append(fault)

    def take(self) -> Fault | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.pop(0)
            return Fault(fault.status, 1, fault.retry_after, fault.delay, fault.diagnostics)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self._faults]
