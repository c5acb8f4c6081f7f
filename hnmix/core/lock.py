"""One process per directory: an exclusive flock on DIR/.lock that holds the holder's pid and host.

The kernel releases a flock when its process exits, however it exits (also SIGKILL), so a lock left by a
crashed run never blocks the next one; the file itself stays (removing it would race with a new holder).
On NFS, Linux maps flock to an NFS lock that holds across hosts while the server's lock service works (with
`nolock` or `local_lock=flock` it is local to each host). Where flock fails outright (ENOLCK, some FUSE
mounts) the run goes on with a warning, and nothing keeps a second process out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from hnmix.errors import HnmixError

LOCK_NAME = ".lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirectoryLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise HnmixError naming the holder; returns a warning when the filesystem has no
        flock (the run then goes on unlocked)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise HnmixError(f"{self.path.parent} is in use by another hnmix run ({who}, holding {self.path}): "
                             "wait for it to end, or choose another --output") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in UNSUPPORTED:
                raise
            return (f"cannot lock {self.path} ({e.strerror}: no flock on this filesystem): nothing stops a "
                    "second process from writing the same run")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # forked loader workers may still share the open file
            os.close(self.fd)
            self.fd = None
