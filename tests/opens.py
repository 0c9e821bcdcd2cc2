"""How many times files are opened, by any process (Ray workers included): Linux inotify, through libc.

Open and close events are both watched: the kernel merges an event into the one before it only when the two
are identical, so with opens and closes alternating, each open of a file is seen (two readers opening the same
file at the same moment could still merge; the tests read that as one open at worst).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections import Counter

IN_OPEN = 0x20
IN_CLOSE_NOWRITE = 0x10
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class OpenCounter:
    """Counts opens of ``paths`` from the moment it is made; ``counts()`` reads the events so far."""

    def __init__(self, paths: list[str]):
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}
        for path in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_CLOSE_NOWRITE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self.paths[wd] = path
        self.opens: Counter[str] = Counter({p: 0 for p in paths})

    def counts(self) -> Counter[str]:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.opens
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_OPEN and wd in self.paths:
                    self.opens[self.paths[wd]] += 1

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
