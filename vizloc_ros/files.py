"""Outputs written whole or not at all, by every command line, and nothing left behind.

Every file or folder a command writes (a checkpoint, a replay report, a synthetic data
set, an ONNX export, a metrics JSON) is first built under a recognisable temporary name
beside it, ``.NAME.partial-PID``, and renamed into place when complete. While it is
built, the writer holds an advisory lock (``flock``) on it. That lock is the liveness
test: the kernel drops it when the writer dies, even by ``kill -9``, so the next writer
of the same output can tell a temporary of a dead run (removed, :func:`sweep_stale`)
from one of a run still going (:class:`OutputBusy`: two writers of one output), without
trusting a PID that may have been reused.

Temporaries are created with ``os.open(..., 0o666)`` so the umask applies as for any
other file (``mkstemp`` and safetensors' ``save_file`` write mode 0600, unreadable to a
node running as another user).

A finished output is never replaced by surprise: a folder is moved into place with
``renameat2(RENAME_NOREPLACE)`` (a folder that appeared during the run is refused, not
deleted), or, when the caller allows replacing a previous output of its own kind, with
``RENAME_EXCHANGE`` (the old one is removed only after the swap, and only if it still
looks like one of ours). Where ``renameat2`` is missing (not Linux, old libc, a file
system without it) the same checks run just before a plain rename.

Also here, for the same reason: :func:`exit_with_parent` makes a child process end when
its parent dies, so a killed command leaves no process behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: liveness falls back to the PID in the name
    fcntl = None

#: the suffix of a temporary: ``.NAME.partial-PID`` (a folder or a file)
PARTIAL_MARK = ".partial-"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_PR_SET_PDEATHSIG = 1


class OutputError(FileExistsError):
    """An output cannot be written where asked (exists, is a link, is busy); the message
    names it and says what to do."""


class OutputBusy(OutputError):
    """Another process is writing the same output right now."""


def partial_path(path, pid: int | None = None) -> Path:
    """The temporary of ``path`` for the process ``pid`` (this one by default)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid() if pid is None else pid}")


def check_not_a_link(path, what: str = "output") -> None:
    """Refuse a symbolic link as an output, before any work: replacing it would either
    follow it somewhere else or remove the link only after the whole run."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); "
                          "give the real path instead")


# --------------------------------------------------------------------------- locks

def _lock(fd: int) -> bool:
    """Try to take the writer's lock on ``fd``; False if another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock: the PID in the name decides
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_alive(partial: Path, pid: int) -> bool:
    """Whether the process that built ``partial`` is still at it: it holds the lock."""
    try:
        fd = os.open(partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False  # finished (renamed) or cleaned meanwhile
    except OSError:
        return _pid_alive(pid)
    try:
        if fcntl is None:
            return _pid_alive(pid) and pid != os.getpid()
        return not _lock(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_stale(path, what: str = "output") -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that died (a ``kill -9``, a
    power cut); returns what was removed. Raises :class:`OutputBusy` if one belongs to a
    writer that is still running: two processes writing one output would lose a result."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for sibling in siblings:
        match = _PARTIAL.match(sibling.name)
        if not match or match.group("name") != path.name:
            continue
        pid = int(match.group("pid"))
        if _writer_alive(sibling, pid):
            raise OutputBusy(f"another process (pid {pid}) is writing {what} {path} right now "
                             f"(its temporary {sibling.name} is in use); wait for it or choose "
                             "another output")
        _remove(sibling)
        removed.append(sibling)
    return removed


# --------------------------------------------------------------------------- renames

def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    function = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            _LIBC.append(ctypes.CDLL(name, use_errno=True) if name else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _appeared(path: Path, what: str) -> OutputError:
    return OutputError(f"{what} {path} appeared while this run was writing it (another run?): "
                       "not replacing it; this run's result was discarded")


def move_into_place(staged: Path, path: Path, replaceable: Callable[[Path], bool] | None = None,
                    what: str = "output") -> None:
    """Rename the finished ``staged`` to ``path``, atomically.

    ``path`` must not exist, unless ``replaceable(path)`` says it is a previous output
    of the caller's kind: then the two are swapped and the old one removed. Anything
    else at ``path`` (a folder made during the run, a link, a foreign file) is left
    untouched and :class:`OutputError` raised.
    """
    staged, path = Path(staged), Path(path)
    if path.is_symlink():
        check_not_a_link(path, what)
    exists = path.exists()
    if not exists:
        if _renameat2(staged, path, _RENAME_NOREPLACE):
            return
        if not staged.is_dir():  # files: a hard link never replaces
            try:
                os.link(staged, path)
            except FileExistsError:
                raise _appeared(path, what) from None
            except OSError:  # a file system without hard links: the check just before
                if path.exists():
                    raise _appeared(path, what) from None
                os.replace(staged, path)
                return
            staged.unlink()
            return
        if path.exists():
            raise _appeared(path, what)
        os.rename(staged, path)  # never replaces a non-empty folder
        return
    if replaceable is None or not replaceable(path):
        raise _appeared(path, what) if replaceable is None else OutputError(
            f"{what} {path} exists and is not one this command wrote; not replacing it")
    if _renameat2(staged, path, _RENAME_EXCHANGE):
        old = staged  # the previous output, now under the temporary name
        if not replaceable(old):  # swapped for something else in the meantime: swap back
            _renameat2(staged, path, _RENAME_EXCHANGE)
            raise _appeared(path, what)
        _remove(old)
        return
    if staged.is_dir():
        old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        os.rename(path, old)
        os.rename(staged, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, path)


# --------------------------------------------------------------------------- writers

def _create_locked(partial: Path, folder: bool) -> int:
    """Create the temporary (umask applies) and lock it; returns the locked descriptor."""
    if folder:
        os.mkdir(partial, 0o777)
        fd = os.open(partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    else:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    if not _lock(fd):  # cannot happen for a name just created, unless the PID was reused
        os.close(fd)
        raise OutputBusy(f"{partial} is locked by another process")
    return fd


def _open_partial(path: Path, folder: bool, what: str) -> tuple[Path, int]:
    check_not_a_link(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path, what)
    partial = partial_path(path)
    return partial, _create_locked(partial, folder)


def _discard(partial: Path, fd: int) -> None:
    os.close(fd)  # the lock goes with it; a rename kept the inode, not the lock
    if partial.exists() or partial.is_symlink():
        _remove(partial)


def _rule(replaceable):
    return (lambda _p: True) if replaceable is True else (replaceable or None)


@contextlib.contextmanager
def staged(path, folder: bool = False, replaceable: Callable[[Path], bool] | bool | None = True,
           what: str = "output") -> Iterator[Path]:
    """Build ``path`` under its locked temporary, then move it into place.

    Yields the temporary (a new empty folder with ``folder=True``, else an empty file to
    write by name). On leaving the block normally the file is flushed to disk and renamed
    (see :func:`move_into_place`; ``replaceable=True``: any file at ``path`` may be
    replaced, ``None``: nothing may). On an exception, or a signal that ends the block,
    the temporary is removed; a ``kill -9`` leaves it for :func:`sweep_stale`.
    """
    path = Path(path)
    partial, fd = _open_partial(path, folder, what)
    try:
        yield partial
        if not folder:
            _fsync(partial)
        move_into_place(partial, path, _rule(replaceable), what)
    finally:
        _discard(partial, fd)


@contextlib.contextmanager
def staged_files(paths, what: str = "output") -> Iterator[list[Path]]:
    """:func:`staged` for files that belong together (a checkpoint's tensors and its
    JSON): all are written under their temporaries first, then moved into place in the
    order given, so a failure while writing any of them replaces none."""
    paths = [Path(p) for p in paths]
    opened: list = []
    try:
        for path in paths:
            opened.append(_open_partial(path, False, what))
        yield [partial for partial, _ in opened]
        for partial, _ in opened:
            _fsync(partial)
        for path, (partial, _) in zip(paths, opened):
            move_into_place(partial, path, _rule(True), what)
    finally:
        for partial, fd in opened:
            _discard(partial, fd)


@contextlib.contextmanager
def scratch_folder(path, what: str = "output") -> Iterator[Path]:
    """A private folder for work that is not an output itself (a map made, then refined,
    before it is published): ``path``'s locked temporary, ``.NAME.partial-PID``, removed on
    leaving the block whatever happens. One left by a ``kill -9`` is swept by the next run
    that asks for the same ``path``; one of a live run is :class:`OutputBusy`. Give a
    ``path`` that no output takes (e.g. ``MAP.safetensors.work``): the temporary of an
    output of the same name would be refused as busy."""
    partial, fd = _open_partial(Path(path), True, what)
    try:
        yield partial
    finally:
        _discard(partial, fd)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_bytes(path, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path`` whole or not at all (umask respected)."""
    with staged(path, what=what) as partial:
        with open(partial, "wb") as handle:
            handle.write(data)
    return Path(path)


def write_text(path, text: str, what: str = "output") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


# --------------------------------------------------------------------------- processes

def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a child: ask the kernel to send ``sig`` when the parent dies (Linux
    ``PR_SET_PDEATHSIG``), and end now if it already has (it may have died before the
    request). Elsewhere this does nothing; the child's own end-of-pipe check remains."""
    libc = _libc()
    prctl = getattr(libc, "prctl", None) if libc is not None else None
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
