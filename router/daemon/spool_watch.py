"""What the supervisor sees of the spool through inotify: new files in incoming/ and deferred/,
and those directories themselves being moved away or removed by hand.

The spool directory is watched too: its events say at once that a queue directory was moved
away or removed (the directory's own IN_DELETE_SELF waits until no process holds it open). A
directory that went is watched again at its path, made anew if need be, and the spool is read
again; so is an overflowed event queue, which may have lost names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from router.logs.lines import QMGR, logger
from router.spool import DEFERRED, INCOMING, Spool

log = logger(QMGR)

_GONE = inotify_flags.DELETE_SELF | inotify_flags.MOVE_SELF  # the watched directory itself went away
_ROOT = ""  # the spool directory: watched for its queue directories being moved away or removed
_ROOT_MASK = inotify_flags.DELETE | inotify_flags.MOVED_FROM | inotify_flags.ONLYDIR
WATCHED = {
    INCOMING: inotify_flags.MOVED_TO | inotify_flags.CLOSE_WRITE | _GONE,
    DEFERRED: inotify_flags.MOVED_TO | inotify_flags.CLOSE_WRITE | inotify_flags.ATTRIB | _GONE,
}


class SpoolWatch:
    """inotify on the spool. `arrived[queue](name)` hears each file named in incoming/ and
    deferred/; `rescan()` is asked for when names may have been missed (an overflow, a queue
    directory made anew). Call `read()` when `fileno()` is readable."""

    def __init__(self, spool: Spool, arrived: Mapping[str, Callable[[str], None]], rescan: Callable[[], None]) -> None:
        self.spool = spool
        self.arrived = arrived
        self.rescan = rescan
        self.inotify = INotify()
        self.watches: dict[int, str] = {self.inotify.add_watch(str(spool.root), _ROOT_MASK): _ROOT}
        for queue in WATCHED:
            self._watch(queue)

    def fileno(self) -> int:
        return self.inotify.fileno()

    def read(self) -> None:
        """Events name files in a watched directory; an event without a name is about the
        directory itself (moved away, removed, its watch dropped) and never names a message."""
        gone: set[str] = set()
        for event in self.inotify.read(timeout=0):
            queue = self.watches.get(event.wd)
            if event.mask & inotify_flags.Q_OVERFLOW:
                log.warning("inotify queue overflowed; rescanning incoming/ and deferred/")
                self.rescan()
            elif queue is None:
                continue  # a watch already replaced
            elif queue == _ROOT:
                if event.name in WATCHED:
                    gone.add(event.name)
            elif event.mask & (_GONE | inotify_flags.IGNORED):
                gone.add(queue)
            elif event.name:
                self.arrived[queue](event.name)
        for queue in gone:
            self._rewatch(queue)

    def _watch(self, queue: str) -> None:
        self.watches[self.inotify.add_watch(self.spool.path(queue), WATCHED[queue])] = queue

    def _rewatch(self, queue: str) -> None:
        """A watched directory was moved away or removed (by hand): watch the one now at its
        path, made anew if there is none, and read what it holds. What was in the old one is
        wherever it was moved; put it back into incoming/ to have it delivered."""
        for wd in [wd for wd, watched in self.watches.items() if watched == queue]:
            del self.watches[wd]
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass  # the kernel dropped it already (IN_IGNORED)
        try:
            self.spool.create()
            self._watch(queue)
        except OSError as exc:
            log.critical("%s/ was moved away or removed and cannot be made again: %s; new mail there is "
                         "not seen until the daemon is restarted", self.spool.path(queue), exc.strerror or exc)
            return
        log.warning("%s/ was moved away or removed; watching the directory now at that path", self.spool.path(queue))
        self.rescan()
