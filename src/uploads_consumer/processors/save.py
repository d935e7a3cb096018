"""The built-in `save` processor: {DECRYPT_DOWNLOAD_PATH}/{email}/{file_uuid}/{clean filename}."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.processors import ProcessingContext

MAX_COMPONENT_BYTES = 200  # leaves room for the temporary suffix under the usual 255-byte limit
DIR_MODE = 0o700
FILE_MODE = 0o600


def safe_component(text: str) -> str:
    """Reduce any string to one harmless path component.

    Separators, NUL and control characters become `_`; a leading dot becomes `_` (so neither `.`,
    `..` nor hidden files can result); ordinary characters such as `@ + . space` and non-ASCII
    letters are kept. Long names are cut to MAX_COMPONENT_BYTES, keeping the extension.
    """
    text = unicodedata.normalize("NFC", text)
    cleaned = "".join(
        "_" if (c in "/\\" or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")) else c for c in text
    )
    cleaned = cleaned.strip()
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if not cleaned:
        return "_"
    if len(cleaned.encode("utf-8")) > MAX_COMPONENT_BYTES:
        stem, dot, ext = cleaned.rpartition(".")
        ext = dot + ext if dot and len(ext.encode()) <= 16 else ""
        stem = cleaned[: len(cleaned) - len(ext)]
        while len((stem + ext).encode("utf-8")) > MAX_COMPONENT_BYTES:
            stem = stem[:-1]
        cleaned = stem + ext
    return cleaned


def _ensure_private_dir(path: Path, root: Path) -> list[Path]:
    """Create `path` (under `root`) without following symlinks out of it. Returns the folders that
    gained an entry (the parent of each folder made): they are fsynced with the file's own folder."""
    changed: list[Path] = []
    current = root
    for part in path.relative_to(root).parts:
        parent, current = current, current / part
        try:
            os.mkdir(current, DIR_MODE)
            changed.append(parent)
            continue  # mkdir never follows a symlink at its last component: this is a real folder
        except FileExistsError:
            pass
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):  # a symlink or file planted in the tree: refuse
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED, f"save: {current.relative_to(root)} is not a real directory"
            )
    return changed


class _Placement:
    """One file on its way to {root}/{email}/{file_uuid}/{filename}: `place_file`'s steps, split in two.

    `link` and `open` are quick metadata calls; `commit` (and `copy`, when the file system refuses
    a hard link) waits for the disk. The daemon runs the first on the event loop and hands the
    second to a worker thread in one go: a thread hop for every system call cost more CPU than the
    calls themselves (bench/run.py). Whoever runs `commit` or `copy_and_commit` owns the clean-up.
    """

    def __init__(self, root: Path, email: str, file_uuid: str, filename: str, size: int) -> None:
        self.root = root
        self.dest = target_path(root, email, file_uuid, filename)
        self.tmp = self.dest.with_name(f".{self.dest.name}.{secrets.token_hex(4)}.part")
        self.size = size
        self._fd = -1
        self._dirs: list[Path] = []
        self._dir_fds: list[int] = []
        self._placed = False

    def link(self, source: Path) -> bool:
        """Make the folders and hard-link `source` at the temporary name; False if a copy is needed."""
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        changed = _ensure_private_dir(self.dest.parent, self.root)
        self._dirs = [self.dest.parent, *reversed(changed)]
        try:
            os.link(source, self.tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            return False
        return True

    def copy(self, source: Path) -> None:
        shutil.copyfile(source, self.tmp, follow_symlinks=False)

    def open(self) -> None:
        """Open the temporary file and the folders to fsync; check the size (a copy cut short by a full
        disk or a quota must never be renamed into place as if it were the file)."""
        self._fd = os.open(self.tmp, os.O_RDONLY | os.O_NOFOLLOW)
        st = os.fstat(self._fd)
        if stat.S_IMODE(st.st_mode) != FILE_MODE:  # a copy (a link keeps the private file's 0600)
            os.fchmod(self._fd, FILE_MODE)
        if st.st_size != self.size:
            raise OSError(errno.EIO, f"wrote {st.st_size} of {self.size} bytes")
        for folder in self._dirs:
            self._dir_fds.append(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))

    def commit(self) -> None:
        """Durable, then renamed (a reader sees the old file or the whole new one), then the folders durable.

        A symlink planted at `dest` is itself replaced (rename never follows it), so nothing is
        ever written through it.
        """
        os.fsync(self._fd)
        os.replace(self.tmp, self.dest)
        self._placed = True
        for fd in self._dir_fds:
            os.fsync(fd)

    def close(self) -> None:
        for fd in (self._fd, *self._dir_fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd, self._dir_fds = -1, []
        if not self._placed:
            # A file planted where a folder belongs makes this NotADirectoryError: the reason
            # already raised (PermanentError) must be what the caller sees.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self.tmp.unlink()

    @contextlib.contextmanager
    def reasons(self) -> Iterator[None]:
        """OSError becomes the project's errors: a name the file system refuses is permanent, the
        rest (disk full, permissions) retryable."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
                raise PermanentError(
                    ErrorClass.PROCESSOR_FAILED, f"save: cannot create {self.dest.name!r}: {exc.strerror}"
                ) from None
            where = self.dest.parent.relative_to(self.root)
            raise RetryableError(f"save: {exc.strerror or exc} ({where})") from None

    def finish(self, source: Path, linked: bool) -> Path:
        """The blocking part: copy (if not linked), open, commit, clean up. Owns the clean-up."""
        try:
            with self.reasons():
                if not linked:
                    self.copy(source)
                if self._fd < 0:
                    self.open()
                self.commit()
            return self.dest
        finally:
            self.close()


def target_path(root: Path, email: str, file_uuid: str, filename: str) -> Path:
    return root / safe_component(email) / safe_component(file_uuid) / safe_component(filename)


def place_file(root: Path, email: str, file_uuid: str, filename: str, source: Path, size: int) -> Path:
    """Put `source` (`size` bytes) at {root}/{email}/{file_uuid}/{filename}, atomically and durably.

    Each component is reduced to one safe path component; nothing is written outside `root`;
    a reader sees the old file or the whole new one; the file, its folder and any folder made for it
    are fsynced. Blocking: call it in a worker thread (the daemon uses `place_file_async`).
    Raises RetryableError (disk full, permissions) or PermanentError (a name the file system refuses).
    `root` is taken as it is (the pipeline resolves DECRYPT_DOWNLOAD_PATH once, at start).
    """
    placement = _Placement(root, email, file_uuid, filename, size)
    try:
        with placement.reasons():
            linked = placement.link(source)
    except BaseException:
        placement.close()
        raise
    return placement.finish(source, linked)


async def place_file_async(root: Path, email: str, file_uuid: str, filename: str, source: Path, size: int) -> Path:
    """`place_file` for the event loop: folders, hard link and opens here (quick metadata calls),
    the fsyncs and the rename (or a copy) in one worker-thread call."""
    placement = _Placement(root, email, file_uuid, filename, size)
    try:
        with placement.reasons():
            linked = placement.link(source)
            if linked:
                placement.open()
    except BaseException:
        placement.close()
        raise
    # From here the worker owns the placement: a cancelled wait (shutdown) must neither stop it
    # halfway nor close its file descriptors under it, so the wait is shielded.
    work = asyncio.get_running_loop().run_in_executor(None, placement.finish, source, linked)
    return await asyncio.shield(work)


def place_bytes(root: Path, work_dir: Path, email: str, file_uuid: str, filename: str, data: bytes) -> Path:
    """`place_file` for a small output made in memory (a transcript): written to `work_dir` first."""
    name = ""
    try:
        fd, name = tempfile.mkstemp(dir=work_dir, prefix="out-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return place_file(root, email, file_uuid, filename, Path(name), len(data))
    except OSError as exc:
        raise RetryableError(f"save: {exc.strerror or exc} (work directory)") from None
    finally:
        if name:
            Path(name).unlink(missing_ok=True)


async def save(ctx: ProcessingContext) -> None:
    """Write the verified plaintext atomically to {DECRYPT_DOWNLOAD_PATH}/{email}/{file_uuid}/{name}."""
    dest = await place_file_async(
        ctx.download_path,
        ctx.event.email,
        ctx.event.file_uuid,
        ctx.metadata.clean_filename,
        ctx.plaintext_path,
        ctx.size,
    )
    ctx.report("path", str(dest))
    ctx.log.debug("saved", path=str(dest))
