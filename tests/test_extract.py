"""The extract processor with a real Tesseract and PDFium: through the daemon for what a deployment sees
(text PDFs, scans and photos read, the text beside the upload and handed to a later step's template,
hostile documents dead-lettered with their class at once), in-process for each limit, and the
reader's sandbox (no network, none of the daemon's variables, nothing left running)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import structlog
from documents import (
    blank_pdf,
    character_error_rate,
    corrupt_pdf,
    encrypted_pdf,
    huge_page_pdf,
    image_file,
    pages_of_text,
    rendered_pages,
    scanned_pdf,
    text_pdf,
)
from helpers import dead_letters, make_files, publish_uploads, read_stream, wait_ready, wait_settled
from prometheus_client import CollectorRegistry
from system import require_tool
from twilio_server import twilio_variables

from uploads_consumer.errors import ErrorClass, PermanentError, ProcessorTimeout
from uploads_consumer.events import parse_event
from uploads_consumer.processors import ProcessingContext, ProcessorEnvironment, StepSkipped, load_processor
from uploads_consumer.processors.extract import Extract, ExtractSettings
from uploads_consumer.processors.extract.image_size import NotThatImage, page_sizes

INTEROP = Path(__file__).parent / "interop"
MAX_CER = 0.02  # Tesseract reads these clean renders nearly perfectly; a regression shows as more


@pytest.fixture(scope="module")
def tesseract() -> str:
    return require_tool("tesseract")


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The documents every test here reads, made once: text we know, and what it was drawn from."""
    folder = tmp_path_factory.mktemp("documents")
    text = pages_of_text(3, seed=1)
    scan = pages_of_text(1, seed=2)
    photo = pages_of_text(1, lines=12, seed=3)
    width, height, pixels = rendered_pages(photo)[0]
    big = rendered_pages(photo, dpi=700)[0]  # 5950 × 7700: Tesseract needs about 250 MiB for it
    return {
        "big.png": image_file(folder / "big.png", *big),
        "text": text,
        "scan": scan,
        "photo": photo,
        "report.pdf": text_pdf(folder / "report.pdf", text),
        "scan.pdf": scanned_pdf(folder / "scan.pdf", scan),
        "page.png": image_file(folder / "page.png", width, height, pixels),
        "page.jpg": image_file(folder / "page.jpg", width, height, pixels),
        "locked.pdf": encrypted_pdf(folder / "locked.pdf"),
        "broken.pdf": corrupt_pdf(folder / "broken.pdf"),
        "huge.pdf": huge_page_pdf(folder / "huge.pdf", folder),
        "long.pdf": blank_pdf(folder / "long.pdf", 6),
    }


def joined(pages: list[list[str]]) -> str:
    return "\f".join("\n".join(lines) for lines in pages)


# --- through the daemon -----------------------------------------------------------------------


async def test_through_the_daemon_documents_are_read_written_beside_the_upload_and_hostile_ones_end_at_once(
    tmp_path, tesseract, docs, twilio, settings_for, start_daemon, nats_server, downloads
):
    """A text PDF, a scanned PDF and a photographed page are read (the scans by OCR, checked by character
    error rate), their text is `{name}.txt` beside the saved upload and a later step's template shows
    its facts; an encrypted, a corrupt, a 200-inch and a too-long PDF are dead-lettered on their first
    delivery with their own reason and class; a file that is no document skips the step."""
    daemon = start_daemon(
        PROCESSORS="save,extract,sms",
        EXTRACT_MAX_PAGES="5",
        **twilio_variables(
            twilio,
            SMS_BODY="${filename}: ${extract_pages} pages (${extract_ocr_pages} by OCR), ${extract_words} words, "
            "${extract_language}",
            SMS_WHEN="extract_pages!=",  # only when extract read something
        ),
    )
    await wait_ready(daemon, nats_server.url)
    settings = settings_for()
    names = ["report.pdf", "scan.pdf", "page.png", "locked.pdf", "broken.pdf", "huge.pdf", "long.pdf"]
    events = {name: (await publish_uploads(settings, [docs[name]]))[0] for name in names}
    [other] = await publish_uploads(settings, make_files(tmp_path / "other", 1))
    await wait_settled(nats_server.url, len(names) + 1, daemon=daemon, timeout=120)
    outcomes = {
        outcome: daemon.metric("uploads_consumer_processor_outcomes_total", f'processor="extract",outcome="{outcome}"')
        for outcome in ("ok", "failed", "retry", "skipped")
    }
    assert outcomes == {"ok": 3, "failed": 4, "retry": 0, "skipped": 1}, "a hostile document's fault: not retried"
    assert daemon.terminate() == 0

    results = {
        json.loads(m.data)["event_id"]: json.loads(m.data) for m in await read_stream(nats_server.url, "FILE_PROCESSED")
    }
    expected = {"report.pdf": (docs["text"], 3, 0), "scan.pdf": (docs["scan"], 1, 1), "page.png": (docs["photo"], 1, 1)}
    for name, (pages, count, ocr) in expected.items():
        event = events[name]
        out = results[event.event_id]["outputs"]["extract"]
        txt = downloads / event.email / event.file_uuid / f"{name}.txt"
        assert out["txt_path"] == str(txt)
        written = txt.read_text(encoding="utf-8")
        if ocr:
            assert character_error_rate(joined(pages), written) <= MAX_CER
        else:
            assert written == joined(pages), "a text layer is taken as it is"
        assert (out["format"], out["pages"], out["ocr_pages"], out["language"]) == (
            name[-3:].replace("jpg", "jpeg"),
            count,
            ocr,
            "en",
        )
        assert out["words"] == len(written.split()) and out["characters"] == len(written.replace("\f", ""))
        assert out["summary"] == " ".join(written.split())[:279].rsplit(" ", 1)[0] + "…"
        assert oct(txt.stat().st_mode & 0o777) == "0o600"
    sent = {r.body for r in twilio.accepted()}
    assert sent == {
        f"{name}: {count} pages ({ocr} by OCR), {results[events[name].event_id]['outputs']['extract']['words']} words, en"
        for name, (_, count, ocr) in expected.items()
    }, "a later step's template sees extract's outputs; no text for what extract skipped"
    assert results[other.event_id]["skipped"] == ["extract", "sms"]

    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    refused = {
        "locked.pdf": ("unsupported_media", "extract: locked.pdf is an encrypted PDF that needs a password to open"),
        "broken.pdf": ("unsupported_media", "extract: cannot read broken.pdf: not a PDF, or damaged beyond repair"),
        "huge.pdf": (
            "resource_limit",
            "extract: huge.pdf on page 1 is 60001×60001 pixels at 300 dpi, over EXTRACT_MAX_PIXELS (40000000)",
        ),
        "long.pdf": ("resource_limit", "extract: long.pdf has 6 pages, over EXTRACT_MAX_PAGES (5)"),
    }
    for name, (error_class, reason) in refused.items():
        headers = dead[events[name].event_id]
        assert (headers["Uploads-Error-Class"], headers["Uploads-Error"]) == (error_class, reason)


# --- in-process: the processor and its reader ---------------------------------------------------


@pytest.fixture
async def processor(monkeypatch, tmp_path, tesseract):
    made: list[Extract] = []

    async def make(**variables: str) -> Extract:
        for field in ExtractSettings.model_fields:
            monkeypatch.delenv("EXTRACT_" + field.upper(), raising=False)
        for variable, value in variables.items():
            monkeypatch.setenv(variable, value)
        env = ProcessorEnvironment(tmp_path / "downloads", ("extract",), 300.0, CollectorRegistry())
        loaded = load_processor("extract", env)
        assert isinstance(loaded.instance, Extract)
        await loaded.start()
        made.append(loaded.instance)
        return loaded.instance

    yield make
    for extract in made:
        await extract.close()


def upload(path: Path, content_type: str, work: Path) -> ProcessingContext:
    from uploads_consumer.envelope import parse_metadata

    metadata = json.loads((INTEROP / "objects" / "basic" / "1.bin").read_bytes())
    metadata["original_filename"] = path.name
    ctx = ProcessingContext(
        event=parse_event((INTEROP / "messages" / "basic.bin").read_bytes()),
        metadata=parse_metadata(json.dumps(metadata).encode()),
        download_path=work / "downloads",
        work_dir=work / f"work-{path.name}",
        log=structlog.get_logger("test"),
        plaintext_path=path,
        size=path.stat().st_size,
        sha256="0" * 64,
        content_type=content_type,
    )
    ctx.current = "extract"
    return ctx


async def test_a_jpeg_photo_of_a_page_is_read_by_ocr_and_its_text_handed_to_later_steps(processor, docs, tmp_path):
    extract = await processor()
    ctx = upload(docs["page.jpg"], "image/jpeg", tmp_path)
    await extract.run(ctx)
    assert character_error_rate("\n".join(docs["photo"][0]), ctx.files["text"].read_text()) <= MAX_CER
    assert ctx.outputs["extract"]["ocr_pages"] == 1


async def test_the_language_is_told_apart_as_iso_639_1(processor, tmp_path):
    german = [["Der Hund läuft schnell über die grüne Wiese und bellt die Vögel an, die im Baum sitzen."] * 3]
    french = [["Le chat dort tranquillement sur le canapé pendant que la pluie tombe sur les fenêtres."] * 3]
    extract = await processor()
    for pages, code in ((german, "de"), (french, "fr")):
        ctx = upload(text_pdf(tmp_path / f"{code}.pdf", pages), "application/pdf", tmp_path)
        await extract.run(ctx)
        assert ctx.outputs["extract"]["language"] == code


async def test_without_ocr_a_scan_reports_its_pages_without_text_and_needs_no_tesseract(processor, docs, tmp_path):
    extract = await processor(EXTRACT_OCR="false", EXTRACT_TESSERACT="/nonexistent/tesseract")
    ctx = upload(docs["scan.pdf"], "application/pdf", tmp_path)
    await extract.run(ctx)
    out = ctx.outputs["extract"]
    assert (out["pages"], out["ocr_pages"], out["pages_without_text"], out["words"], out["language"]) == (
        1,
        0,
        1,
        0,
        None,
    )


async def test_a_document_over_its_cpu_limit_is_resource_limit_naming_the_variable(processor, docs, tmp_path):
    extract = await processor(EXTRACT_CPU_LIMIT="1s")
    with pytest.raises(PermanentError) as caught:
        await extract.run(upload(docs["scan.pdf"], "application/pdf", tmp_path))
    assert caught.value.error_class is ErrorClass.RESOURCE_LIMIT
    assert caught.value.reason.startswith("extract: scan.pdf used up EXTRACT_CPU_LIMIT (1s of CPU time)")


@pytest.mark.parametrize(("name", "limit"), [("scan.pdf", "100MiB"), ("big.png", "175MiB")])
async def test_a_document_over_its_memory_limit_is_resource_limit_naming_the_variable(
    processor, docs, tmp_path, name, limit
):
    """Too little for the reader itself (it crashes), or for Tesseract (which may still exit 0, with no
    text): either way the document's doing, never an empty page."""
    extract = await processor(EXTRACT_MEMORY_LIMIT=limit, EXTRACT_MAX_PIXELS="50000000")
    with pytest.raises(PermanentError) as caught:
        await extract.run(upload(docs[name], "application/pdf" if name.endswith(".pdf") else "image/png", tmp_path))
    assert caught.value.error_class is ErrorClass.RESOURCE_LIMIT
    assert f"EXTRACT_MEMORY_LIMIT ({limit.removesuffix('MiB')} MiB)" in caught.value.reason


async def test_a_document_over_its_wall_time_is_a_processor_timeout_and_nothing_is_left_running(
    processor, docs, tmp_path
):
    extract = await processor(EXTRACT_TIMEOUT="1s")
    with pytest.raises(ProcessorTimeout, match=r"extract: scan.pdf took longer than EXTRACT_TIMEOUT \(1s\)") as caught:
        await extract.run(upload(docs["scan.pdf"], "application/pdf", tmp_path))
    assert caught.value.variable == "EXTRACT_TIMEOUT", "retried PROCESSOR_TIMEOUT_RETRIES times, then processor_timeout"
    server = extract.reader._proc
    assert server is not None
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    assert children == [], "the reader and its Tesseract were killed"


async def test_an_image_whose_bytes_are_another_format_is_unsupported_media(processor, docs, tmp_path):
    extract = await processor()
    with pytest.raises(PermanentError) as caught:
        await extract.run(upload(docs["page.png"], "image/jpeg", tmp_path))
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "extract: page.png is not a readable jpeg: not a JPEG"


async def test_a_type_it_does_not_read_is_skipped(processor, docs, tmp_path):
    extract = await processor()
    with pytest.raises(StepSkipped, match=r"extract: report\.pdf is image/gif, not a document format it reads"):
        await extract.run(upload(docs["report.pdf"], "image/gif", tmp_path))


async def test_the_reader_has_no_network_and_none_of_the_daemons_variables(processor, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-the-reader")
    extract = await processor()
    server = extract.reader._proc
    assert server is not None
    assert extract.reader.ready["network"] == "isolated"
    assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    environment = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    assert sorted(v.split(b"=")[0] for v in environment if v) == [b"LC_ALL", b"PATH"]


async def test_a_reader_keeps_its_heap_from_one_page_to_the_next(processor, tmp_path):
    """A fresh process's malloc unmaps PDFium's large per-page buffers at each free; the server sets
    glibc to keep them, and every reader inherits it: a 100-page text PDF touches about 2 000 pages of
    memory, not 14 000 (0.4 ms of CPU a page of text, bench/extract.py). The server has also read a
    page of its own, so PDFium's first-use work is done before any reader is forked."""
    extract = await processor()
    assert extract.reader.ready["warm"] is True
    ctx = upload(text_pdf(tmp_path / "long.pdf", pages_of_text(100, seed=7)), "application/pdf", tmp_path)
    folder = tmp_path / "job"
    folder.mkdir()
    ended = await extract.reader.run(extract.job(ctx, "pdf", folder), 60)
    assert ended.exit == 0
    assert 0 < ended.faults < 5000, f"{ended.faults} page faults for 100 pages"


async def test_a_reader_that_is_killed_is_started_again_for_the_next_document(processor, docs, tmp_path):
    extract = await processor()
    server = extract.reader._proc
    assert server is not None
    server.kill()
    await server.wait()
    await asyncio.sleep(0.1)
    ctx = upload(docs["report.pdf"], "application/pdf", tmp_path)
    await extract.run(ctx)
    assert ctx.outputs["extract"]["pages"] == 3


# --- image headers ---------------------------------------------------------------------------------


def test_image_sizes_come_from_the_header_of_each_format(tmp_path):
    import pyvips

    image = pyvips.Image.black(123, 45)
    for suffix, kind in ((".png", "png"), (".jpg", "jpeg"), (".tif", "tiff"), (".webp", "webp")):
        path = tmp_path / f"i{suffix}"
        image.write_to_file(str(path))
        assert page_sizes(str(path), kind, 10) == [(123, 45)], kind
    lossless = tmp_path / "lossless.webp"
    image.webpsave(str(lossless), lossless=True)
    assert page_sizes(str(lossless), "webp", 10) == [(123, 45)]


def test_a_tiff_says_each_page_and_stops_reading_past_the_limit(tmp_path):
    import pyvips

    pages = pyvips.Image.arrayjoin([pyvips.Image.black(30, 20)] * 5, across=1)
    path = tmp_path / "pages.tif"
    pages.tiffsave(str(path), page_height=20)
    assert page_sizes(str(path), "tiff", 10) == [(30, 20)] * 5
    assert len(page_sizes(str(path), "tiff", 2)) == 3, "one more than the limit says there are too many"


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff", "webp"])
def test_bytes_that_are_not_that_image_are_refused(tmp_path, kind):
    path = tmp_path / "noise"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 4 if kind != "png" else b"GIF89a" + b"\0" * 30)
    with pytest.raises(NotThatImage):
        page_sizes(str(path), kind, 10)
