"""Safe file-system primitives (DESIGN.md, "Safety"): what the job writes never follows a link, what it reads is a
regular file of bounded size.

The output volume is shared: anyone who can write there can plant a symbolic link at a name the job will use
(job ids and process ids are predictable). So every path the job creates, replaces or deletes goes through here:

    make_dir(path)              a real folder: created, or an existing one that is no link (UnsafePath otherwise)
    temp_path(folder, name)     .<name>.tmp-<pid>-<16 random hex>: never predictable, created exclusively
    make_temp_dir(folder, name) such a folder, created by mkdir (which never follows a link)
    write_atomic(path, data)    a temporary file (O_CREAT|O_EXCL|O_NOFOLLOW), fsync, rename over `path`: a link
                                planted at `path` is replaced, never followed
    append(path, data)          O_APPEND|O_NOFOLLOW|O_NONBLOCK, a regular file only (a link or a FIFO: UnsafePath)
    open_lock(path)             O_RDWR|O_CREAT|O_NOFOLLOW, never truncated
    read_own(path, limit)       a file the job wrote, read without following a link
    remove(path)                a file or a link unlinked (the link, not its target), a real folder removed
                                (shutil.rmtree never descends into a link)
    check_tree(root)            every entry under root is a real folder or a regular file with no other hard link
                                (UnsafePath names the first that is not)

Inputs (data, config and template files) may be anything a path names: a FIFO blocks a reader forever,
/dev/zero never ends, a huge file exhausts memory. So they are opened with O_NONBLOCK, checked with fstat to be
regular files no larger than a stated limit (InputError otherwise), and read in bounded blocks and lines:

    open_input(path, setting, limit)   an InputFile: read(n) and iteration by lines, each at most max_line bytes
    read_input(path, setting, limit)   the whole (bounded) content as bytes
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from app.errors import DataError, SettingsError, clip

# Input size limits, in one place. Data files are read whole into memory (conversations, then token ids): the
# bound is generous for SFT data (OpenWeights' largest research sets are tens of MB) and refuses what would
# exhaust a host before training starts.
MAX_DATA_FILE_BYTES = 4 * 2**30  # FT_TRAINING_FILE, FT_TEST_FILE, logp and sampling datasets
MAX_CONFIG_BYTES = 2**20  # FT_CONFIG_FILE (.json): a settings object is a few KB
MAX_SWEEP_BYTES = 16 * 2**20  # FT_CONFIG_FILE (.jsonl): one settings object per line
MAX_TEMPLATE_BYTES = 2**20  # FT_CHAT_TEMPLATE as a .jinja file: published templates are under 20 KB
MAX_OWN_FILE_BYTES = 64 * 2**20  # a file the job wrote itself and reads back (result.json, metrics.jsonl)
READ_BLOCK = 2**20  # bytes per read() of an input

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(SettingsError):
    """A path the job would write through is a link or not what the job writes there (exit 2)."""

    def __init__(self, message: str):
        super().__init__([message])


class InputError(DataError):
    """An input is not a regular file, or larger than its limit (exit 2)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _describe_link(path: Path) -> str:
    try:
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    except OSError:
        return f"{path} is a symbolic link"


def _unsafe(path: Path, what: str | None = None) -> UnsafePath:
    what = what or _describe_link(path)
    return UnsafePath(f"FT_OUTPUT_DIR: {what}. The job never writes, replaces or deletes through a link or a special "
                      "file in its output: remove it (it was not created by the job), or use another FT_OUTPUT_DIR.")


# --- outputs -----------------------------------------------------------------------------------------------------


def temp_path(folder: Path, name: str, kind: str = "tmp") -> Path:
    """An unpredictable name beside `name` in `folder`: .<name>.<kind>-<pid>-<random> (app/jobdir.py clears
    `.*.tmp-*` and `.*.old-*` left by a killed run)."""
    return Path(folder) / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(8)}"


def make_dir(path: Path) -> Path:
    """`path` as a real folder: created (its parent must exist), or an existing folder that is not a link."""
    path = Path(path)
    try:
        os.mkdir(path)
        return path
    except FileExistsError:
        pass
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise _unsafe(path)
    if not stat.S_ISDIR(mode):
        raise _unsafe(path, f"{path} exists and is {_kind(mode)}, where the job keeps a folder")
    return path


def make_temp_dir(folder: Path, name: str) -> Path:
    """A new folder with an unpredictable name in `folder` (mkdir fails on anything already there)."""
    _require_dir(folder)
    path = temp_path(folder, name)
    os.mkdir(path)
    return path


def _require_dir(folder: Path, follow: bool = False) -> None:
    mode = os.stat(folder).st_mode if follow else os.lstat(folder).st_mode
    if stat.S_ISLNK(mode):
        raise _unsafe(Path(folder))
    if not stat.S_ISDIR(mode):
        raise _unsafe(Path(folder), f"{folder} is {_kind(mode)}, where the job keeps a folder")


def _create_exclusive(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)


def fsync_dir(path: Path, follow: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, parent_may_be_link: bool = False) -> None:
    """Write `data` under an unpredictable temporary name in the same folder, fsync, rename over `path`: whole or
    absent. A link at `path` is replaced by the file, never followed. The folder must exist and be no link, but
    for FT_OUTPUT_DIR itself (`parent_may_be_link`: where the user mounts or links the volume is theirs to say)."""
    path = Path(path)
    _require_dir(path.parent, follow=parent_may_be_link)
    tmp = temp_path(path.parent, path.name)
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # the old file stays as it was; no temporary is left behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent, follow=parent_may_be_link)


def _open_regular(path: Path, flags: int) -> int:
    """os.open without following a link and without blocking on a FIFO; the fd of a regular file."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _unsafe(Path(path)) from None
        if err.errno == errno.ENXIO:  # a FIFO opened for writing without a reader
            raise _unsafe(Path(path), f"{path} is a FIFO (named pipe), where the job writes a file") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _unsafe(Path(path), f"{path} is {_kind(info.st_mode)}, where the job writes a file")
    if info.st_nlink > 1:  # a hard link to a file elsewhere: appending would change that file
        os.close(fd)
        raise _unsafe(Path(path), f"{path} has {info.st_nlink - 1} other hard link(s)")
    return fd


def append(path: Path, data: bytes) -> None:
    """Append to a regular file (created when absent), never through a link."""
    fd = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def open_lock(path: Path) -> int:
    """The job's lock file: opened read-write, created when absent, never truncated, never through a link."""
    return _open_regular(path, os.O_RDWR | os.O_CREAT)


def read_own(path: Path, limit: int = MAX_OWN_FILE_BYTES) -> bytes | None:
    """A file the job wrote (result.json, metrics.jsonl), read without following a link: None when absent, a
    link, not a regular file, or over `limit` bytes (then it is not the job's)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete what is at `path`: a real folder with everything in it, anything else (a link: the link itself)
    unlinked. Missing is fine; errors inside a folder are ignored (what is left is cleared on the next run)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # never follows a link inside (fd-based walk)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def check_tree(root: Path) -> None:
    """Every entry under `root` (itself included) is a real folder or a regular file; UnsafePath names the first
    that is not (a planted link, FIFO or device)."""
    _require_dir(root)
    stack = [Path(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                mode, path = info.st_mode, Path(entry.path)
                if stat.S_ISDIR(mode):
                    stack.append(path)
                elif not stat.S_ISREG(mode):
                    raise _unsafe(path, _describe_link(path) if stat.S_ISLNK(mode) else f"{path} is {_kind(mode)}")
                elif info.st_nlink > 1:  # the job writes no hard link: one planted would carry appends outside
                    raise _unsafe(path, f"{path} has {info.st_nlink - 1} other hard link(s)")


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


# --- inputs ------------------------------------------------------------------------------------------------------


def _size(limit: int) -> str:
    return f"{limit / 2**30:g} GiB" if limit >= 2**30 else f"{limit / 2**20:g} MiB"


class InputFile:
    """A regular input file opened by open_input: read(n) and line iteration, both bounded."""

    def __init__(self, fd: int, path: Path, setting: str, limit: int, max_line: int):
        self.size = os.fstat(fd).st_size  # when opened
        self._handle = os.fdopen(fd, "rb", buffering=READ_BLOCK)
        self.path, self.setting, self.limit, self.max_line = path, setting, limit, max_line
        self._read = 0

    def _count(self, data: bytes) -> bytes:
        self._read += len(data)
        if self._read > self.limit:  # the file grew past its limit while being read
            raise InputError(f"{self.setting}={clip(self.path)}: grew past {_size(self.limit)} while being read; "
                             f"inputs are limited to {_size(self.limit)}.")
        return data

    def read(self, size: int = READ_BLOCK) -> bytes:
        """Up to `size` bytes (all that is left when negative), a block at a time: the limit is checked as it
        grows, so an input that grows while read never fills the memory."""
        blocks, wanted = [], size if size >= 0 else self.limit + 1
        while wanted > 0 and (block := self._count(self._handle.read(min(wanted, READ_BLOCK)))):
            blocks.append(block)
            wanted -= len(block)
        return b"".join(blocks)

    def peek(self, size: int) -> bytes:
        """The next bytes (at most one buffer), not consumed."""
        return self._handle.peek(size)[:size]

    def seek(self, offset: int) -> None:
        self._handle.seek(offset)
        self._read = offset

    def __iter__(self):
        """Lines, newline kept. A line longer than max_line comes back as its first max_line + 1 bytes (the caller
        sees that it is too long); the rest of it is skipped without being held in memory."""
        while True:
            line = self._count(self._handle.readline(self.max_line + 1))
            if not line:
                return
            if len(line) > self.max_line and not line.endswith(b"\n"):
                while True:  # skip to the end of the overlong line, a block at a time
                    rest = self._count(self._handle.readline(READ_BLOCK))
                    if not rest or rest.endswith(b"\n"):
                        break
            yield line

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_input(path: Path, setting: str, limit: int, max_line: int = 64 * 2**20) -> InputFile:
    """Open an input for reading: a regular file (links to one are fine: inputs are read, never written) of at
    most `limit` bytes. Never blocks: a FIFO is opened with O_NONBLOCK and refused after fstat. Raises
    InputError (exit 2) with the setting, the path and what it is; OSError (missing, permission) as os.open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{setting}={clip(path)}: is {_kind(info.st_mode)}, not a regular file. Point {setting} "
                             "at a file (a FIFO, a device or a socket cannot be read whole and safely).")
        if info.st_size > limit:
            raise InputError(f"{setting}={clip(path)}: is {info.st_size / 2**20:,.0f} MiB, over the limit of "
                             f"{_size(limit)} for {setting}. Use a smaller file (split it, or drop what is unused).")
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return InputFile(fd, Path(path), setting, limit, max_line)
    except BaseException:
        os.close(fd)
        raise


def read_input(path: Path, setting: str, limit: int) -> bytes:
    """The whole content of a regular input file of at most `limit` bytes, read in bounded blocks."""
    with open_input(path, setting, limit) as handle:
        blocks = []
        while block := handle.read(READ_BLOCK):
            blocks.append(block)
    return b"".join(blocks)
