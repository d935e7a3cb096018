"""The document reader: the program `extract` runs in a child process to read untrusted documents.

Run as `python -E -s reader.py` (never imported by the daemon), with an environment of PATH and LC_ALL
only. At start it cuts itself off the network (a user and network namespace of its own, where the
kernel allows it), makes sure it dies with the daemon, loads PDFium and CLD2 (pycld2) once, sets
malloc to keep its heap (`keep_heap`), reads a page of its own to warm PDFium up, and says
`{"ready": …}` on stdout. Then it reads one job a line on stdin and forks a reader per job, so a
document is opened in a fresh process that inherits the loaded libraries (a fork costs about a
millisecond; starting Python and PDFium again would cost a hundred). The forked reader limits itself
before it opens anything — RLIMIT_AS (memory), RLIMIT_CPU (its own and its Tesseract runs' CPU time
together, as a budget), no core dump — then reads the document page by page into a UTF-8 text file,
OCRs the pages that have no text layer with the `tesseract` program (which inherits the limits, and
gets what is left of the CPU budget), and writes what it found as JSON. This process reports each
reader's end on stdout (its exit status, CPU time and peak memory, from wait4), and kills a job's
process group when told to (`{"kill": id}`) or when stdin closes.

Standard library only, except PDFium (pypdfium2) and CLD2 (pycld2), imported once the sandbox holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

if __package__:
    from uploads_consumer.processors.extract.image_size import NotThatImage, page_sizes
else:  # run as a program: the package is not imported, the file beside this one is
    from image_size import NotThatImage, page_sizes  # type: ignore[no-redef,import-not-found]

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_KEPT = 32 << 20  # glibc's largest mmap threshold on 64 bits; the trim threshold is twice it
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PAGE_SEPARATOR = "\f"  # between pages in the text file, as pdftotext writes them
LANGUAGE_SAMPLE = 1000  # characters CLD2 reads: enough for a language in a document
MIN_LETTERS = 20  # fewer letters than this say no language
SUMMARY_CHARS = 280
STDERR_KEPT = 300
OUT_OF_MEMORY = ("bad_alloc", "malloc fail", "not made", "Cannot allocate", "Out of memory", "failed to map segment")
# C0 and C1 controls but tab and line feed, and the noncharacters PDFium uses as markers: dropped.
_DROP = dict.fromkeys((*range(9), 11, 12, *range(14, 32), *range(127, 160), 65534, 65535))
_DROP.update({0x0D: None})


class Refused(Exception):
    """The document cannot be read, for a reason the daemon turns into an outcome: `code` is one of
    encrypted, corrupt, pages, pixels, cpu, memory, not_that_image, ocr_failed."""

    def __init__(self, code: str, detail: str = "", page: int | None = None) -> None:
        self.code, self.detail, self.page = code, detail, page
        super().__init__(code)


# -- the sandbox ------------------------------------------------------------------------------


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(libc: Any) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def isolate_network(libc: Any) -> str:
    """A network namespace of our own (with a user namespace, so no privilege is needed): no interface
    but a loopback that is down. Returns `isolated`, or why not."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return f"not isolated: unshare: {os.strerror(ctypes.get_errno())}"
    try:  # the same ids inside as outside: the files it writes belong to the daemon's user
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    except OSError as exc:
        return f"not isolated: id maps: {exc.strerror}"
    return "isolated"


def limit_self(memory: int, cpu: float) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    seconds = max(1, math.ceil(cpu))
    # Soft and hard equal: the kernel kills at the limit (SIGKILL), however the process handles SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))


def keep_heap(libc: Any) -> None:
    """glibc's malloc, as a fresh process starts it, serves an allocation over 128 KiB with its own
    mmap and unmaps it when freed, and gives the heap's free top back to the system; a long-lived
    process raises those thresholds as it goes (dynamically), a forked reader never lives that long.
    PDFium allocates and frees such buffers for every page, so each reader faulted them in afresh
    page after page: 26 000 page faults for a 200-page PDF where a warm process has 2 000, 0.4 ms a
    page of text. Set here, in the server, every reader inherits them; the reader's address space
    stays bounded by RLIMIT_AS, and what it keeps goes when it exits. Not glibc (musl): nothing."""
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, HEAP_KEPT)
        mallopt(M_TRIM_THRESHOLD, 2 * HEAP_KEPT)


WARM_UP_TEXT = "The quick brown fox jumps over it."


def warm_up_pdf() -> bytes:
    """A page of Helvetica text, read once by the server so that PDFium's first-use work (its standard
    fonts, the text extraction's tables) is done before any reader is forked, not again in each one."""
    content = f"BT /F1 12 Tf 72 720 Td ({WARM_UP_TEXT}) Tj ET".encode()
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Resources<</Font<</F1 4 0 R>>>>/Contents 5 0 R>>",
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica/Encoding/WinAnsiEncoding>>",
        b"<</Length %d>>stream\n%s\nendstream" % (len(content), content),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def warm_up(pdfium: Any) -> str:
    """Read warm_up_pdf()'s text (what it found, for the server's check)."""
    document = pdfium.PdfDocument(warm_up_pdf())
    try:
        page = document[0]
        textpage = page.get_textpage()
        found = str(textpage.get_text_range())
        textpage.close()
        page.close()
    finally:
        document.close()
    return found


def cpu_used() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- reading ------------------------------------------------------------------------------------


class Text:
    """The document's text as it is written: page after page to the file, counted on the way, with the
    start kept for the language and the summary."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed by close()
        self.pages = self.ocr_pages = self.blank_pages = self.unread_pages = 0
        self.words = self.characters = 0
        self.start = ""

    def add(self, text: str) -> None:
        text = text.replace("\r\n", "\n").translate(_DROP).strip()
        if self.pages:
            self.file.write(PAGE_SEPARATOR)
        self.file.write(text)
        self.pages += 1
        self.words += len(text.split())
        self.characters += len(text)
        if len(self.start) < LANGUAGE_SAMPLE + SUMMARY_CHARS and text:
            self.start += (" " if self.start else "") + text[: LANGUAGE_SAMPLE + SUMMARY_CHARS]

    def close(self) -> None:
        self.file.close()

    def facts(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "ocr_pages": self.ocr_pages,
            "blank_pages": self.blank_pages,
            "pages_without_text": self.unread_pages,
            "words": self.words,
            "characters": self.characters,
            "language": language_of(self.start[:LANGUAGE_SAMPLE]),
            "summary": summary_of(self.start),
        }


def language_of(sample: str) -> str | None:
    """ISO 639-1 code of the sample's language (CLD2, Chrome's detector: its tables are the library's
    read-only data, so a forked reader copies nothing to use them, where langdetect's 65 MiB of Python
    profiles were copied page by page as it read them), or None when there are too few letters to tell,
    CLD2 is not sure, or it names a language without a two-letter code."""
    if sum(c.isalpha() for c in sample) < MIN_LETTERS:
        return None
    try:
        import pycld2
    except ImportError:
        return None
    try:
        reliable, _, found = pycld2.detect(sample.encode("utf-8", "replace").decode("utf-8"))
    except pycld2.error:
        return None
    code = str(found[0][1]).split("-", 1)[0] if found else "un"
    return code if reliable and len(code) == 2 and code != "un" else None


def summary_of(text: str) -> str:
    """The first words, whitespace made single spaces, at most SUMMARY_CHARS, cut at a word with `…`."""
    flat = " ".join(text.split())
    if len(flat) <= SUMMARY_CHARS:
        return flat
    cut = flat[: SUMMARY_CHARS - 1]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "…"


def tesseract(job: dict[str, Any], source: str, data: bytes | None, page: int | None) -> str:
    """Tesseract on an image file (`source`) or on PGM bytes (`data`, with source `stdin`): its text.
    It inherits RLIMIT_AS and gets what is left of the CPU budget."""
    ocr = job["ocr"]
    left = job["limits"]["cpu"] - cpu_used()
    if left < 0.5:
        raise Refused("cpu", page=page)
    args = [ocr["tesseract"], source, "stdout", "-l", ocr["languages"], "--psm", "3"]
    if data is not None:
        args += ["--dpi", str(ocr["dpi"])]

    def limits() -> None:  # in the child, before exec: this process has one thread
        libc = _libc()
        die_with_parent(libc)
        seconds = max(1, math.ceil(left))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))

    run = subprocess.run(
        args,
        input=data,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "OMP_THREAD_LIMIT": "1"},
        preexec_fn=limits,
    )
    said = run.stderr.decode("utf-8", "replace")
    if run.returncode in (-signal.SIGKILL, -signal.SIGXCPU) and cpu_used() >= job["limits"]["cpu"] - 1:
        raise Refused("cpu", page=page)
    # Short of memory under RLIMIT_AS, Tesseract and Leptonica say so in several ways, and sometimes
    # still exit 0 with no text: never taken for an empty page.
    if run.returncode in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS) or any(m in said for m in OUT_OF_MEMORY):
        raise Refused("memory", page=page)
    errors = [line.strip() for line in said.splitlines() if line.strip().startswith("Error")]
    if run.returncode == 0 and not errors:
        return run.stdout.decode("utf-8", "replace")
    lines = errors or [line.strip() for line in said.splitlines() if line.strip()]
    raise Refused("ocr_failed", lines[0][:STDERR_KEPT] if lines else f"exit {run.returncode}", page=page)


def read_pdf(job: dict[str, Any], text: Text) -> None:
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    limits = job["limits"]
    try:
        document = pdfium.PdfDocument(job["source"])
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code in (raw.FPDF_ERR_PASSWORD, raw.FPDF_ERR_SECURITY):
            raise Refused("encrypted") from None
        raise Refused("corrupt", "not a PDF, or damaged beyond repair") from None
    count = len(document)
    if count > limits["pages"]:
        raise Refused("pages", str(count))
    ocr = job["ocr"] is not None
    for number in range(1, count + 1):
        try:
            page = document[number - 1]
        except pdfium.PdfiumError:
            raise Refused("corrupt", f"page {number} cannot be read", page=number) from None
        textpage = page.get_textpage()
        found = textpage.get_text_range() if textpage.count_chars() > 0 else ""
        textpage.close()
        if not found.strip():
            if raw.FPDFPage_CountObjects(page) == 0:
                text.blank_pages += 1
            elif not ocr:
                text.unread_pages += 1
            else:
                found = ocr_page(job, page, number)
                text.ocr_pages += 1
        page.close()
        text.add(found)
    document.close()


def ocr_page(job: dict[str, Any], page: Any, number: int) -> str:
    """Render a page without a text layer at the OCR resolution, grey, and read it with Tesseract."""
    dpi = job["ocr"]["dpi"]
    width, height = page.get_size()
    scale = dpi / 72
    pixels_wide, pixels_high = math.ceil(width * scale), math.ceil(height * scale)
    if pixels_wide * pixels_high > job["limits"]["pixels"]:
        raise Refused("pixels", f"{pixels_wide}×{pixels_high} pixels at {dpi} dpi", page=number)
    bitmap = page.render(scale=scale, grayscale=True, may_draw_forms=False)
    try:
        rows = bytes(bitmap.buffer)
        if bitmap.stride != bitmap.width:  # rows padded: keep the pixels only
            rows = b"".join(rows[y * bitmap.stride : y * bitmap.stride + bitmap.width] for y in range(bitmap.height))
        pgm = b"P5\n%d %d\n255\n" % (bitmap.width, bitmap.height) + rows
    finally:
        bitmap.close()
    del rows
    return tesseract(job, "stdin", pgm, number)


def read_image(job: dict[str, Any], text: Text) -> None:
    limits = job["limits"]
    try:
        sizes = page_sizes(job["source"], job["format"], limits["pages"])
    except NotThatImage as exc:
        raise Refused("not_that_image", str(exc)) from None
    if len(sizes) > limits["pages"]:
        raise Refused("pages", f"more than {limits['pages']}")
    for number, (width, height) in enumerate(sizes, 1):
        if width == 0 or height == 0:
            raise Refused("not_that_image", f"page {number} is {width}×{height}")
        if width * height > limits["pixels"]:
            raise Refused("pixels", f"{width}×{height} pixels", page=number if len(sizes) > 1 else None)
    if job["ocr"] is None:
        for _ in sizes:
            text.unread_pages += 1
            text.add("")
        return
    found = tesseract(job, job["source"], None, None).split(PAGE_SEPARATOR)
    for number in range(len(sizes)):
        text.add(found[number] if number < len(found) else "")
        text.ocr_pages += 1


def read(job: dict[str, Any]) -> dict[str, Any]:
    """One document, in the forked reader, limits in force: what it found, or why it was refused."""
    text = Text(job["text_path"])
    try:
        (read_pdf if job["format"] == "pdf" else read_image)(job, text)
    except Refused as exc:
        return {"ok": False, "code": exc.code, "detail": exc.detail, "page": exc.page}
    except MemoryError:
        return {"ok": False, "code": "memory", "detail": "", "page": text.pages + 1}
    finally:
        text.close()
    return {"ok": True, **text.facts()}


def run_job(job: dict[str, Any]) -> None:
    """The forked reader: limits first, then the document; its findings to `result_path`; never returns."""
    code = 0
    gc.disable()  # a short life: no collection to copy the server's pages for
    try:
        os.setpgid(0, 0)
        die_with_parent(_libc())
        # The protocol's pipes are the server's: a reader that went wrong cannot speak for another job.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        limit_self(job["limits"]["memory"], job["limits"]["cpu"])
        result = read(job)
        with open(job["result_path"], "w", encoding="utf-8") as f:
            json.dump(result, f)
    except BaseException:  # noqa: BLE001 - anything else: the daemon sees the exit status
        code = 70
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc(limit=5)
    finally:
        os._exit(code)


# -- the server ---------------------------------------------------------------------------------


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> None:
    libc = _libc()
    die_with_parent(libc)
    if os.getppid() == 1:  # the daemon is gone already
        return
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    network = isolate_network(libc)
    versions: dict[str, Any] = {}
    try:
        import pypdfium2 as pdfium

        versions["pdfium"] = str(pdfium.PDFIUM_INFO)
    except ImportError as exc:
        say({"ready": False, "problem": f"pypdfium2 cannot be imported: {exc}"})
        return
    try:
        import pycld2  # noqa: F401 - loaded once here: every fork finds it in memory

        versions["cld2"] = True
    except ImportError:
        versions["cld2"] = False
    keep_heap(libc)
    try:
        versions["warm"] = warm_up(pdfium).strip() == WARM_UP_TEXT
    except pdfium.PdfiumError:  # not worth failing for: each reader does that work itself then
        versions["warm"] = False
    # Every object made so far is kept out of the collector's reach: a fork then shares their pages
    # instead of copying each one the collector would touch.
    gc.freeze()
    say({"ready": True, "network": network, **versions})

    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    running: dict[str, tuple[int, int]] = {}  # job id → (pid, pidfd)
    pending = b""
    try:
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        return
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            handle(json.loads(line), running, selector)
                else:
                    finished(key.data, running, selector)
    finally:
        for pid, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def handle(message: dict[str, Any], running: dict[str, tuple[int, int]], selector: Any) -> None:
    if "kill" in message:
        if message["kill"] in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running[message["kill"]][0], signal.SIGKILL)
        return
    job_id = message["id"]
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the reader: none of the server's descriptors (its pipes, the other jobs' pidfds)
        for _, pidfd in running.values():
            os.close(pidfd)
        selector.close()
        run_job(message)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here, so a kill that comes first finds the group
    pidfd = os.pidfd_open(pid)
    running[job_id] = (pid, pidfd)
    selector.register(pidfd, selectors.EVENT_READ, job_id)


def finished(job_id: str, running: dict[str, tuple[int, int]], selector: Any) -> None:
    pid, pidfd = running.pop(job_id)
    selector.unregister(pidfd)
    os.close(pidfd)
    _, status, usage = os.wait4(pid, 0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # a Tesseract it left behind
    say(
        {
            "id": job_id,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "cpu": round(usage.ru_utime + usage.ru_stime, 4),
            "max_rss": usage.ru_maxrss * 1024,
            "faults": usage.ru_minflt,
            "at": time.monotonic(),
        }
    )


if __name__ == "__main__":
    serve()
