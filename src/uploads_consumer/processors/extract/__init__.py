"""The built-in `extract` processor: the text of documents, and facts about it.

PDF text comes from PDFium (pypdfium2); a page with no text layer (a scan) and an image (PNG, JPEG,
TIFF, WebP) go through Tesseract OCR (`tesseract`, EXTRACT_OCR_LANGUAGES). The language is detected
with CLD2 (pycld2; ISO 639-1), words and characters are counted, and the text is written as
`{name}.txt` (UTF-8, pages separated by form feeds) beside the saved upload; later steps get it as
`files["text"]`, and the facts and a short summary as outputs (`${extract_summary}` in a template).

Documents are hostile: they are opened only in the document reader (`reader.py`), a child process with
no network (where the kernel allows a namespace of its own), none of the daemon's variables, and
limits on its address space (EXTRACT_MEMORY_LIMIT), CPU time (EXTRACT_CPU_LIMIT, Tesseract's
included) and wall time (EXTRACT_TIMEOUT); a document over EXTRACT_MAX_PAGES, or a page whose render
would be over EXTRACT_MAX_PIXELS, is refused before it is read or rendered. A limit the document hits
is its own doing and ends it (`resource_limit`); only the wall clock, which a busy host can run out,
is transient.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from uploads_consumer.config import PositiveDuration, PositiveSize
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, ProcessorTimeout, RetryableError, one_line
from uploads_consumer.observability import get_logger
from uploads_consumer.processors import (
    Need,
    ProcessingContext,
    Processor,
    ProcessorEnvironment,
    ProcessorSettings,
    StepSkipped,
    variable_prefix,
)
from uploads_consumer.processors.extract.sandbox import Ended, JobTimedOut, ReaderServer
from uploads_consumer.processors.save import place_file

log = get_logger("uploads_consumer.processors.extract")

FORMATS = {
    "application/pdf": "pdf",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/tiff": "tiff",
    "image/webp": "webp",
}
_LANGUAGE = re.compile(r"^[A-Za-z0-9_]+$")
MiB = 1 << 20


def _languages(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else re.split(r"[,+]", str(value))
    languages = tuple(item.strip() for item in items if str(item).strip())
    if not languages:
        raise ValueError("expected Tesseract language names such as eng or eng,deu")
    for language in languages:
        if not _LANGUAGE.match(language):
            raise ValueError(f"{language!r} is not a Tesseract language name (eng, deu, chi_sim, …)")
    return languages


Languages = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_languages)]


class ExtractSettings(ProcessorSettings):
    ocr: bool = Field(default=True, description="OCR images and pages without text (Tesseract); false: PDF text only")
    ocr_languages: Languages = Field(
        default=("eng",), description="Tesseract languages, comma-separated (eng,deu); each must be installed"
    )
    ocr_dpi: int = Field(default=300, ge=70, le=1200, description="the resolution pages without text are OCRed at")
    tesseract: str = Field(default="tesseract", description="the tesseract binary")
    max_pages: int = Field(default=500, ge=1, description="documents with more pages are resource_limit, unread")
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="a page rendered for OCR, or an image, larger than this (width × height) is resource_limit",
    )
    cpu_limit: PositiveDuration = Field(
        default="5m",
        validate_default=True,
        description="CPU time for one document, OCR included; over it is resource_limit",
    )
    memory_limit: PositiveSize = Field(
        default="1GiB", validate_default=True, description="address space of the reader and of each OCR run"
    )
    timeout: PositiveDuration = Field(
        default="10m", validate_default=True, description="wall time for one document; over it is transient"
    )
    concurrency: int = Field(default=2, ge=1, le=64, description="documents read at once in this process")


class Extract(Processor):
    """Text out of documents: PDF text (PDFium), OCR of images and scanned pages (Tesseract), the language,
    word and character counts; `{name}.txt` beside the saved upload.

    Parsed in a child process with memory, CPU and time limits and no network. A document that hits a
    limit is resource_limit; an encrypted or corrupt one unsupported_media; other types are skipped.
    """

    settings_class = ExtractSettings
    needs = Need.PLAINTEXT
    content_types = tuple(FORMATS)
    settings: ExtractSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        self.prefix = variable_prefix(name)
        self.tesseract: str | None = None
        self.reader = ReaderServer()
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    def variable(self, setting: str) -> str:
        return f"{self.prefix}{setting.upper()}"

    async def start(self) -> None:
        try:
            import pypdfium2  # noqa: F401 - only whether it is there; the reader loads it
        except ImportError:
            raise ConfigError(
                "PROCESSORS", f"{self.name} needs pypdfium2: pip install 'uploads-consumer[extract]'"
            ) from None
        if self.settings.ocr:
            self.tesseract = await self._find_tesseract()
        try:
            ready = await self.reader.start()
        except RetryableError as exc:
            raise ConfigError("PROCESSORS", f"{self.name}: {exc.reason.removeprefix('extract: ')}") from None
        if ready.get("network") != "isolated":
            log.warning(
                "extract: the document reader could not get a network namespace of its own; PDFium and "
                "Tesseract open no connection, but nothing stops one",
                processor=self.name,
                why=ready.get("network"),
            )
        if not ready.get("cld2"):
            log.warning("extract: pycld2 is not installed: no language is detected", processor=self.name)
        log.info(
            "extract: ready",
            processor=self.name,
            pdfium=ready.get("pdfium"),
            tesseract=self.tesseract,
            languages="+".join(self.settings.ocr_languages) if self.settings.ocr else None,
            network=ready.get("network"),
        )

    async def _find_tesseract(self) -> str:
        variable = self.variable("tesseract")
        found = shutil.which(self.settings.tesseract)
        if found is None:
            raise ConfigError(
                variable,
                f"{self.settings.tesseract!r} not found: apt-get install tesseract-ocr tesseract-ocr-eng, set "
                f"{variable} to the binary, or {self.variable('ocr')}=false for PDF text only",
            )
        try:
            listed = await asyncio.to_thread(
                subprocess.run,
                [found, "--list-langs"],
                capture_output=True,
                timeout=30,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(variable, f"cannot run it ({type(exc).__name__})") from None
        installed = set(listed.stdout.decode(errors="replace").split()[1:] if listed.returncode == 0 else [])
        if not installed:
            raise ConfigError(variable, "does not answer --list-langs as tesseract does")
        missing = [lang for lang in self.settings.ocr_languages if lang not in installed]
        if missing:
            raise ConfigError(
                self.variable("ocr_languages"),
                f"{', '.join(missing)} not installed for Tesseract (installed: {', '.join(sorted(installed))}; "
                f"Debian: apt-get install tesseract-ocr-{missing[0].replace('_', '-').lower()})",
            )
        return found

    async def close(self) -> None:
        await self.reader.close()

    def job(self, ctx: ProcessingContext, kind: str, folder: Path) -> dict[str, Any]:
        s = self.settings
        return {
            "source": str(ctx.plaintext_path),
            "format": kind,
            "text_path": str(folder / "text.txt"),
            "result_path": str(folder / "result.json"),
            "limits": {"pages": s.max_pages, "pixels": s.max_pixels, "cpu": s.cpu_limit, "memory": s.memory_limit},
            "ocr": (
                {"tesseract": self.tesseract, "languages": "+".join(s.ocr_languages), "dpi": s.ocr_dpi}
                if s.ocr and self.tesseract
                else None
            ),
        }

    async def run(self, ctx: ProcessingContext) -> None:
        name = ctx.metadata.clean_filename
        kind = FORMATS.get(ctx.content_type.split(";", 1)[0].strip().lower())
        if kind is None:
            raise StepSkipped(f"extract: {name} is {ctx.content_type}, not a document format it reads")
        if ctx.size == 0:
            raise PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"extract: {name} is empty")
        folder = ctx.work_dir / self.name.replace(":", "_")
        await asyncio.to_thread(folder.mkdir, mode=0o700, exist_ok=True)
        job = self.job(ctx, kind, folder)
        async with self._slots:
            try:
                ended = await self.reader.run(job, self.settings.timeout)
            except JobTimedOut:  # a busy host may be why: retried, PROCESSOR_TIMEOUT_RETRIES times for this upload
                raise ProcessorTimeout(
                    self.variable("timeout"),
                    f"extract: {name} took longer than {self.variable('timeout')} ({self.settings.timeout:g}s)",
                ) from None
        found = await asyncio.to_thread(_read_result, Path(job["result_path"]))
        if found is None or ended.exit != 0:
            raise self._died(name, ended)
        if not found.get("ok"):
            raise self._refused(name, kind, found)
        text = Path(job["text_path"])
        placed = await asyncio.to_thread(self._place, ctx, name, text)
        ctx.files["text"] = text
        ctx.report("format", kind)
        facts = checked(found)
        for key in ("pages", "ocr_pages", "language", "words", "characters", "summary"):
            ctx.report(key, facts[key])
        if facts["pages_without_text"]:
            ctx.report("pages_without_text", facts["pages_without_text"])
        ctx.report("txt_path", str(placed))
        ctx.log.info(
            "extract: text read",
            pages=found.get("pages"),
            ocr_pages=found.get("ocr_pages"),
            cpu_seconds=round(ended.cpu, 3),
            peak_rss_mib=round(ended.max_rss / MiB, 1),
        )

    @staticmethod
    def _place(ctx: ProcessingContext, name: str, text: Path) -> Path:
        """`{name}.txt` beside the saved upload, atomically, with save's naming rules."""
        return place_file(
            ctx.download_path, ctx.event.email, ctx.event.file_uuid, f"{name}.txt", text, text.stat().st_size
        )

    def _limit(self, setting: str, shown: str) -> str:
        return f"{self.variable(setting)} ({shown})"

    def _refused(self, name: str, kind: str, found: dict[str, Any]) -> PermanentError:
        """The reader's own reason → the outcome: a limit the document reached, or a document that cannot be read."""
        code, detail, page = str(found.get("code")), one_line(str(found.get("detail") or ""), 200), found.get("page")
        at = f" on page {page}" if isinstance(page, int) else ""
        s = self.settings
        limit = ErrorClass.RESOURCE_LIMIT
        if code == "encrypted":
            return PermanentError(
                ErrorClass.UNSUPPORTED_MEDIA, f"extract: {name} is an encrypted PDF that needs a password to open"
            )
        if code == "corrupt":
            return PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"extract: cannot read {name}: {detail}")
        if code == "not_that_image":
            return PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"extract: {name} is not a readable {kind}: {detail}")
        if code == "pages":
            return PermanentError(
                limit, f"extract: {name} has {detail} pages, over {self._limit('max_pages', str(s.max_pages))}"
            )
        if code == "pixels":
            return PermanentError(
                limit, f"extract: {name}{at} is {detail}, over {self._limit('max_pixels', str(s.max_pixels))}"
            )
        if code == "cpu":
            return PermanentError(
                limit, f"extract: {name} used up {self._limit('cpu_limit', f'{s.cpu_limit:g}s of CPU time')}{at}"
            )
        if code == "memory":
            return PermanentError(
                limit, f"extract: {name} ran out of {self._limit('memory_limit', _mib(s.memory_limit))}{at}"
            )
        if code == "ocr_failed":
            return PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"extract: Tesseract cannot read {name}{at}: {detail}")
        return PermanentError(ErrorClass.PROCESSOR_FAILED, f"extract: the reader refused {name} ({code})")

    def _died(self, name: str, ended: Ended) -> UploadsErrorType:
        """The reader ended without a result: killed at its CPU limit, or crashed (short of memory, or
        a decoder's bug the same document meets again): the document's doing either way."""
        s = self.settings
        limit = ErrorClass.RESOURCE_LIMIT
        if ended.signal is not None:
            killer = signal.Signals(ended.signal).name
            if ended.signal in (signal.SIGKILL, signal.SIGXCPU) and ended.cpu >= s.cpu_limit - 1:
                return PermanentError(
                    limit, f"extract: {name} used up {self._limit('cpu_limit', f'{s.cpu_limit:g}s of CPU time')}"
                )
            if ended.signal == signal.SIGKILL:
                # Not at its CPU limit: the system's OOM killer, or someone's kill. Not the document's fault.
                return RetryableError(f"extract: the document reader was killed by SIGKILL reading {name}")
            return PermanentError(
                limit,
                f"extract: the document reader crashed ({killer}) reading {name}, most likely short of "
                f"{self._limit('memory_limit', _mib(s.memory_limit))}",
            )
        return RetryableError(f"extract: the document reader failed on {name} (exit {ended.exit}); see its log lines")


UploadsErrorType = PermanentError | RetryableError


def _mib(size: int) -> str:
    return f"{size / MiB:g} MiB" if size % (1 << 30) else f"{size >> 30} GiB"


SUMMARY_MOST = 300
_ISO_639 = re.compile(r"^[a-z]{2,3}$")


def checked(found: dict[str, Any]) -> dict[str, Any]:
    """What the reader wrote, taken for what it must be: the reader parsed a hostile document, so a
    subverted one could write anything; counts are counts, the language a code, the summary short."""

    def count(key: str) -> int:
        value = found.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    language, summary = found.get("language"), found.get("summary")
    return {
        **{key: count(key) for key in ("pages", "ocr_pages", "words", "characters", "pages_without_text")},
        "language": language if isinstance(language, str) and _ISO_639.match(language) else None,
        "summary": summary[:SUMMARY_MOST] if isinstance(summary, str) else "",
    }


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > 64 * 1024:  # a few counts and 280 characters: anything more is not ours
            return None
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
