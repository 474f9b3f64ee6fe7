"""Spawned processes without multiprocessing's resource tracker.

Note [No resource tracker]
~~~~~~~~~~~~~~~~~~~~~~~~~~
The first time a process spawns a child with :mod:`multiprocessing`'s ``spawn``, it starts a resource
tracker (one more interpreter, about 7 MiB of PSS for the life of the web process) and hands its
descriptor to every child, so that the named semaphores and ``shared_memory`` segments a child creates
are unlinked if it dies. The pool creates neither: its arenas are memfds (freed with their last
descriptor) and its channels are socket pairs and pipes. So :class:`Process` spawns exactly as
``multiprocessing.get_context("spawn").Process`` does (the same command line, preparation data and
``__main__`` handling) but passes no tracker descriptor. A child that does create such a resource (a
model's own ``multiprocessing.Queue``, say) starts a tracker of its own the first time it registers
one: ``spawn_main`` leaves the child's tracker descriptor unset, and the tracker starts on first use.
"""

from __future__ import annotations

import io
import os
from multiprocessing import popen_spawn_posix, spawn
from multiprocessing import util as _util
from multiprocessing.context import SpawnProcess, reduction, set_spawning_popen  # type: ignore[attr-defined]
from typing import Any

util: Any = _util  # typeshed lacks close_fds and types spawnv_passfds's path as bytes

__all__ = ["Process"]


class _Popen(popen_spawn_posix.Popen):
    """``popen_spawn_posix.Popen`` (CPython 3.9-3.13) without ``resource_tracker.getfd()``."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(pipe_handle=child_r)
            fds: list[int] = self._fds  # type: ignore[attr-defined]
            fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, fds)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            self.finalizer = util.Finalize(self, util.close_fds, [fd for fd in (parent_r, parent_w)
                                                                   if fd is not None])
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


class Process(SpawnProcess):
    """A ``spawn`` process started without multiprocessing's resource tracker (Note [No resource
    tracker])."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)
