"""Document benchmark: the `extract` processor against pypdfium2 and the `tesseract` CLI called directly.

    python bench/extract.py                     # text PDFs of 1, 10, 50 and 200 pages, scans of 1 and 3 pages, 5 rounds
    python bench/extract.py --rounds 5 --skip-scans

The documents are made here with known text (tests/documents.py): PDFs with a text layer (40 lines of
12 pt Helvetica a page), and scans (the same kind of pages rendered grey at 300 dpi, as JPEG, wrapped
as image-only PDFs).

- "extract": the processor as the daemon runs it (started once, like a daemon: its reader server is
  warm), `run()` on each document — the fork of a sandboxed reader with its limits, PDFium, Tesseract
  for the scans, CLD2 for the language, the counts, the `.txt` placed beside the upload (linked and fsynced).
  CPU time is the bench process's own during `run()`, plus the reader's and its Tesseract runs' (from
  wait4), plus the reader server's (from /proc): everything it costs. Peak RSS is the reader's (or a
  Tesseract run's, the larger), from wait4.
- "direct": a warm Python process of its own that has imported pypdfium2, doing the least the same
  result needs: open the PDF, each page's text (`get_text_range`); for a page without text, render it
  grey at 300 dpi and pipe it as PGM to `tesseract stdin stdout` (the same arguments). CPU time is that
  process's own plus its Tesseract runs'.
- "direct in a fresh process": the same calls in a fork of that warm process, one per document, as any
  per-document sandbox must run them (but without extract's limits and namespace): the child's CPU
  time and the parent's for the fork. The gap between "direct" and this is what a fresh process costs
  the same work; the gap between this and "extract" is extract's own. Its peak RSS is measured apart, once per document, in a
  fresh process of its own (a warm process keeps what earlier documents made it allocate): the larger
  of that process's and its Tesseract runs'.

Both run Tesseract with OMP_THREAD_LIMIT=1 (extract's setting: documents are read side by side;
Tesseract's OpenMP threads would otherwise spin and count CPU time that does no work). The rounds are
interleaved, the order alternating; the table gives medians. OCR accuracy is the character error rate
of each side's text against the text that made the page. Machines here are shared and noisy: read the
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from documents import character_error_rate, pages_of_text, scanned_pdf, text_pdf  # noqa: E402

MiB = 1 << 20

DIRECT = r"""
import json, os, resource, subprocess, sys, time
import pypdfium2 as pdfium

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "OMP_THREAD_LIMIT": "1"}

def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def read(path):
    began = cpu()
    pdf = pdfium.PdfDocument(path)
    texts, tesseract_rss = [], 0
    for page in pdf:
        textpage = page.get_textpage()
        text = textpage.get_text_range()
        textpage.close()
        if not text.strip():
            bitmap = page.render(scale=300 / 72, grayscale=True)
            pgm = b"P5\n%d %d\n255\n" % (bitmap.width, bitmap.height) + bytes(bitmap.buffer)
            bitmap.close()
            run = subprocess.run(["tesseract", "stdin", "stdout", "-l", "eng", "--psm", "3", "--dpi", "300"],
                                 input=pgm, capture_output=True, env=ENV, check=True)
            text = run.stdout.decode()
            tesseract_rss = max(tesseract_rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        texts.append(text)
        page.close()
    pdf.close()
    return {"cpu": cpu() - began, "rss": max(peak_rss(), tesseract_rss), "text": "\f".join(texts)}

for line in sys.stdin:
    mode, _, path = line.strip().partition(" ")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from here
    if mode == "warm":
        print(json.dumps(read(path)), flush=True)
        continue
    # "fresh": the same calls in a fork of this warm process, as a per-document sandbox must run them
    # (without its limits or namespace): the child's CPU time and this process's own for the fork.
    r, w = os.pipe()
    began = os.times()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(read(path)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        found = json.loads(pipe.read())
    _, _, usage = os.wait4(pid, 0)
    now = os.times()
    found["cpu"] = usage.ru_utime + usage.ru_stime + (now.user + now.system) - (began.user + began.system)
    print(json.dumps(found), flush=True)
"""


def process_cpu(pid: int) -> float:
    """CPU seconds of a process (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ExtractSide:
    """The processor as a daemon holds it: started once; one run() per document."""

    def __init__(self, work: Path) -> None:
        self.work = work

    async def start(self) -> None:
        import structlog
        from prometheus_client import CollectorRegistry

        from uploads_consumer.processors import ProcessorEnvironment, load_processor

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        os.environ.pop("EXTRACT_OCR_LANGUAGES", None)
        env = ProcessorEnvironment(self.work / "downloads", ("extract",), 300.0, CollectorRegistry())
        self.loaded = load_processor("extract", env)
        await self.loaded.start()
        self.extract = self.loaded.instance
        self.runs = 0
        # The reader's end, as the processor hears it, kept for the figures.
        self.ended: Any = None
        original = self.extract.reader.run

        async def run(job: dict[str, Any], timeout: float) -> Any:
            self.ended = await original(job, timeout)
            return self.ended

        self.extract.reader.run = run

    async def read(self, path: Path) -> dict[str, Any]:
        import json as _json

        import structlog

        from uploads_consumer.envelope import parse_metadata
        from uploads_consumer.events import parse_event
        from uploads_consumer.processors import ProcessingContext

        interop = ROOT / "tests" / "interop"
        metadata = _json.loads((interop / "objects" / "basic" / "1.bin").read_bytes())
        metadata["original_filename"] = path.name
        self.runs += 1
        ctx = ProcessingContext(
            event=parse_event((interop / "messages" / "basic.bin").read_bytes()),
            metadata=parse_metadata(_json.dumps(metadata).encode()),
            download_path=self.work / "downloads",
            work_dir=self.work / f"work-{self.runs}",
            log=structlog.get_logger("bench"),
            plaintext_path=path,
            size=path.stat().st_size,
            sha256="0" * 64,
            content_type="application/pdf",
        )
        ctx.current = "extract"
        server = self.extract.reader._proc.pid
        server_before, own_before = process_cpu(server), time.process_time()
        await self.extract.run(ctx)
        own = time.process_time() - own_before
        server_cpu = process_cpu(server) - server_before
        return {
            "cpu": own + server_cpu + self.ended.cpu,
            "parts": {"daemon": own, "reader server": server_cpu, "reader": self.ended.cpu},
            "rss": self.ended.max_rss,
            "text": ctx.files["text"].read_text(encoding="utf-8"),
        }

    async def close(self) -> None:
        await self.extract.close()


def direct_peak_rss(path: Path) -> float:
    """The direct way's peak RSS for one document, in a fresh process: its own or a Tesseract run's, MiB."""
    run = subprocess.run(
        [sys.executable, "-c", DIRECT], input=f"warm {path}\n", capture_output=True, text=True, check=True
    )
    return float(json.loads(run.stdout)["rss"]) / MiB


class DirectSide:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DIRECT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def read(self, path: Path, mode: str = "warm") -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{mode} {path}\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def read_fresh(self, path: Path) -> dict[str, Any]:
        return self.read(path, "fresh")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-scans", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    documents: list[tuple[str, Path, str, int]] = []  # (label, path, expected text, pages)
    for pages in (1, 10, 50, 200):
        text = pages_of_text(pages, seed=pages)
        documents.append((f"text PDF, {pages} pages", text_pdf(work / f"text-{pages}.pdf", text), "", pages))
    if not args.skip_scans:
        for pages in (1, 3):
            text = pages_of_text(pages, seed=1000 + pages)
            expected = "\f".join("\n".join(lines) for lines in text)
            path = scanned_pdf(work / f"scan-{pages}.pdf", text, dpi=300)
            documents.append((f"scanned PDF, {pages} page{'s' if pages > 1 else ''} (300 dpi)", path, expected, pages))

    extract, direct = ExtractSide(work), DirectSide()
    await extract.start()
    figures: dict[str, dict[str, list[float]]] = {label: {} for label, *_ in documents}
    try:
        # A first, unmeasured pass: each side's caches and lazy imports warmed alike.
        for _, path, _, _ in documents[:1]:
            await extract.read(path)
            direct.read(path)
        for round_number in range(args.rounds):
            for label, path, expected, pages in documents:
                sides = [("extract", extract.read), ("direct", direct.read), ("fresh", direct.read_fresh)]
                if round_number % 2:
                    sides.reverse()
                for side, read in sides:
                    found = read(path)
                    found = await found if asyncio.iscoroutine(found) else found
                    got = figures[label]
                    got.setdefault(f"{side} cpu/page", []).append(found["cpu"] / pages)
                    if side == "extract":
                        got.setdefault("extract rss", []).append(found["rss"] / MiB)
                        for part, seconds in found["parts"].items():
                            got.setdefault(f"part {part}", []).append(seconds / pages)
                    if expected and side != "fresh":
                        got.setdefault(f"{side} cer", []).append(character_error_rate(expected, found["text"]))
            print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr)
        for label, path, _, _ in documents:
            figures[label]["direct rss"] = [direct_peak_rss(path)]
    finally:
        await extract.close()
        direct.close()

    print(f"\n{args.rounds} rounds, medians; CPU time per page in ms; peak RSS in MiB; character error rate\n")
    print(
        "| document | extract CPU/page | direct CPU/page | ratio | direct in a fresh process | ratio to it "
        "| extract peak RSS | direct peak RSS | extract CER | direct CER |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, got in figures.items():
        e, d = statistics.median(got["extract cpu/page"]), statistics.median(got["direct cpu/page"])
        f = statistics.median(got["fresh cpu/page"])
        cer = (
            f"{statistics.median(got['extract cer']):.4f} | {statistics.median(got['direct cer']):.4f}"
            if "extract cer" in got
            else "— | —"
        )
        print(
            f"| {label} | {e * 1000:.2f} | {d * 1000:.2f} | {e / d:.2f}× | {f * 1000:.2f} | {e / f:.2f}× "
            f"| {statistics.median(got['extract rss']):.0f} | "
            f"{statistics.median(got['direct rss']):.0f} | {cer} |"
        )
    print("\nwhere extract's CPU time goes, per page in ms (means: the server's CPU time is read in clock ticks):")
    print("the daemon's own (the bench process during run(): the job, the result, the .txt placed), the reader")
    print("server's (its fork of the reader), the reader's (and its Tesseract runs')\n")
    parts = [key.removeprefix("part ") for key in next(iter(figures.values())) if key.startswith("part ")]
    print("| document | " + " | ".join(parts) + " |")
    print("|---|" + "---|" * len(parts))
    for label, got in figures.items():
        row = " | ".join(f"{statistics.mean(got['part ' + part]) * 1000:.2f}" for part in parts)
        print(f"| {label} | {row} |")
    print(f"\nbench process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
