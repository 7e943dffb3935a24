"""The retry schedule: deferred messages ordered by next attempt time.

Filled from deferred/ file mtimes at start and from worker reports and inotify afterwards, so the
supervisor never rescans the directory or opens a file to know what is due. A heap with lazy
deletion: re-adding a message supersedes its earlier entry.
"""

from __future__ import annotations

import heapq


class Schedule:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def add(self, queue_id: str, due: float) -> None:
        if self._due.get(queue_id) == due:
            return
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))

    def discard(self, queue_id: str) -> None:
        """No attempt for this message (held, deleted); its heap entry goes when it comes up."""
        self._due.pop(queue_id, None)

    def due(self, queue_id: str) -> float | None:
        return self._due.get(queue_id)

    def next_due(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[str]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, queue_id = heapq.heappop(self._heap)
            if self._due.get(queue_id) == when:
                del self._due[queue_id]
                due.append(queue_id)
        return due

    def _drop_stale(self) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
