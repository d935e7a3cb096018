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
    gained an entry (the parent of each folder made): they are fsynced with the file's own folder,
    or a new upload's folder could vanish in a power cut with the file in it."""
    changed: list[Path] = []
    current = root
    for part in path.relative_to(root).parts:
        parent, current = current, current / part
        try:
            try:
                os.mkdir(current, DIR_MODE)
            except FileNotFoundError:
                if parent != root:
                    raise
                root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)  # made at start, but removed since
                changed.append(root.parent)
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


def _link_or_copy(src: Path, dst: Path, size: int) -> None:
    """Place `src` at `dst` (a hard link when possible: no copy), durable before it is renamed.

    The result is checked against `size`: a copy cut short (a full disk, a quota) must never be
    renamed into place as if it were the file.
    """
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst, follow_symlinks=False)
    fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != FILE_MODE:  # a copy (a link keeps the private file's 0600)
            os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
        written = st.st_size
    finally:
        os.close(fd)
    if written != size:
        raise OSError(errno.EIO, f"wrote {written} of {size} bytes")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def target_path(root: Path, email: str, file_uuid: str, filename: str) -> Path:
    return root.joinpath(safe_component(email), safe_component(file_uuid), safe_component(filename))


def place_file(root: Path, email: str, file_uuid: str, filename: str, source: Path, size: int) -> Path:
    """Put `source` (`size` bytes) at {root}/{email}/{file_uuid}/{filename}, atomically and durably.

    Each component is reduced to one safe path component; nothing is written outside `root`;
    a reader sees the old file or the whole new one; the file, its folder and every folder made for
    it are fsynced. Blocking: call it in a worker thread.
    Raises RetryableError (disk full, permissions) or PermanentError (a name the file system refuses).
    `root` is taken as it is (the pipeline resolves DECRYPT_DOWNLOAD_PATH once, at start).
    """
    dest = target_path(root, email, file_uuid, filename)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    placed = False
    try:
        changed = _ensure_private_dir(dest.parent, root)
        _link_or_copy(source, tmp, size)
        # Atomic: a reader sees the old file or the whole new one. A symlink planted at `dest` is
        # itself replaced (rename never follows it), so nothing is ever written through it.
        os.replace(tmp, dest)
        placed = True
        for folder in (dest.parent, *reversed(changed)):
            _fsync_dir(folder)
    except PermanentError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED, f"save: cannot create {dest.name!r}: {exc.strerror}"
            ) from None
        raise RetryableError(f"save: {exc.strerror or exc} ({dest.parent.relative_to(root)})") from None
    finally:
        if not placed:
            # A file planted where a folder belongs makes this NotADirectoryError: the reason
            # already raised (PermanentError above) must be what the caller sees.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                tmp.unlink()
    return dest


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


def save_file(ctx: ProcessingContext) -> Path:
    return place_file(
        ctx.download_path,
        ctx.event.email,
        ctx.event.file_uuid,
        ctx.metadata.clean_filename,
        ctx.plaintext_path,
        ctx.size,
    )


async def save(ctx: ProcessingContext) -> None:
    """Write the verified plaintext atomically to {DECRYPT_DOWNLOAD_PATH}/{email}/{file_uuid}/{name}."""
    dest = await asyncio.to_thread(save_file, ctx)
    ctx.report("path", str(dest))
    ctx.log.debug("saved", path=str(dest))
