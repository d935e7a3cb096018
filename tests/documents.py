"""Documents made in the tests (and bench/extract.py) with text we know: PDFs with a text layer, drawn
with PDFium's own page objects (its built-in Helvetica); scans of the same pages, rendered by PDFium at
a resolution and wrapped as image-only PDFs or written as PNG, JPEG, TIFF; and hostile ones
(encrypted, corrupt, a huge page, too many pages), some written by hand."""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as raw

WORDS = [
    "river",
    "stone",
    "garden",
    "window",
    "morning",
    "quiet",
    "yellow",
    "paper",
    "letter",
    "market",
    "silver",
    "bridge",
    "winter",
    "orange",
    "forest",
    "candle",
    "mountain",
    "harbor",
    "travel",
    "engine",
    "planet",
    "simple",
    "thunder",
    "marble",
    "coffee",
    "lantern",
    "meadow",
    "purple",
    "island",
    "castle",
    "rocket",
    "blanket",
    "whisper",
    "ladder",
    "pocket",
    "velvet",
    "crystal",
    "shadow",
    "copper",
    "anchor",
]
LETTER = (612.0, 792.0)  # points
FONT_SIZE = 12.0
LINE = 16.0
LINES_PER_PAGE = 40


def sentences(count: int, seed: int) -> list[str]:
    """`count` lines of ten words each, different for every seed: text no page repeats."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(count)]


def pages_of_text(pages: int, lines: int = LINES_PER_PAGE, seed: int = 0) -> list[list[str]]:
    return [sentences(lines, seed * 100_000 + n) for n in range(pages)]


def _text_page(document: pdfium.PdfDocument, font: object, lines: list[str], size: tuple[float, float]) -> None:
    page = document.new_page(*size)
    for i, line in enumerate(lines):
        obj = raw.FPDFPageObj_CreateTextObj(document, font, FONT_SIZE)
        buffer = ctypes.create_string_buffer((line + "\0").encode("utf-16-le"))
        raw.FPDFText_SetText(obj, ctypes.cast(buffer, ctypes.POINTER(raw.FPDF_WCHAR)))
        raw.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 54, size[1] - 60 - LINE * i)
        raw.FPDFPage_InsertObject(page, obj)
    page.gen_content()
    page.close()


def text_pdf(path: Path, pages: list[list[str]], size: tuple[float, float] = LETTER) -> Path:
    """A PDF whose pages have a text layer: each page's lines in 12 pt Helvetica."""
    document = pdfium.PdfDocument.new()
    font = raw.FPDFText_LoadStandardFont(document, b"Helvetica")
    for lines in pages:
        _text_page(document, font, lines, size)
    document.save(str(path))
    document.close()
    return path


def rendered_pages(pages: list[list[str]], dpi: int = 300) -> list[tuple[int, int, bytes]]:
    """Each page of text rendered grey at `dpi`, as a scanner would see it: (width, height, pixels)."""
    source = pdfium.PdfDocument.new()
    font = raw.FPDFText_LoadStandardFont(source, b"Helvetica")
    for lines in pages:
        _text_page(source, font, lines, LETTER)
    out = []
    for page in source:
        bitmap = page.render(scale=dpi / 72, grayscale=True)
        rows = bytes(bitmap.buffer)
        if bitmap.stride != bitmap.width:
            rows = b"".join(rows[y * bitmap.stride : y * bitmap.stride + bitmap.width] for y in range(bitmap.height))
        out.append((bitmap.width, bitmap.height, rows))
    return out


def image_file(path: Path, width: int, height: int, pixels: bytes) -> Path:
    """Grey pixels as the image file `path` names (.png, .jpg, .tif, .webp), written by libvips."""
    import pyvips

    image = pyvips.Image.new_from_memory(pixels, width, height, 1, "uchar")
    image.write_to_file(str(path) + ("[Q=90]" if path.suffix in (".jpg", ".webp") else ""))
    return path


def scanned_pdf(path: Path, pages: list[list[str]], dpi: int = 300, work: Path | None = None) -> Path:
    """An image-only PDF: each page a JPEG of the text rendered at `dpi`, no text layer."""
    work = work or path.parent
    document = pdfium.PdfDocument.new()
    for n, (width, height, pixels) in enumerate(rendered_pages(pages, dpi)):
        jpeg = image_file(work / f".scan-{os.getpid()}-{n}.jpg", width, height, pixels)
        page = document.new_page(*LETTER)
        image = pdfium.PdfImage.new(document)
        with open(jpeg, "rb") as f:
            image.load_jpeg(f, inline=True)
        image.set_matrix(pdfium.PdfMatrix().scale(*LETTER))
        page.insert_obj(image)
        page.gen_content()
        page.close()
        jpeg.unlink()
    document.save(str(path))
    document.close()
    return path


def blank_pdf(path: Path, pages: int, size: tuple[float, float] = LETTER) -> Path:
    document = pdfium.PdfDocument.new()
    for _ in range(pages):
        document.new_page(*size).close()
    document.save(str(path))
    document.close()
    return path


def huge_page_pdf(path: Path, work: Path) -> Path:
    """One page 200 inches square (the largest a MediaBox may be) holding an image and no text: OCR would
    render it at 60000 × 60000 pixels."""
    side = 14400.0
    width, height, pixels = rendered_pages([["A small picture."]], dpi=20)[0]
    jpeg = image_file(work / ".huge.jpg", width, height, pixels)
    document = pdfium.PdfDocument.new()
    page = document.new_page(side, side)
    image = pdfium.PdfImage.new(document)
    with open(jpeg, "rb") as f:
        image.load_jpeg(f, inline=True)
    image.set_matrix(pdfium.PdfMatrix().scale(side, side))
    page.insert_obj(image)
    page.gen_content()
    page.close()
    document.save(str(path))
    document.close()
    jpeg.unlink()
    return path


def encrypted_pdf(path: Path) -> Path:
    """A PDF encrypted with the standard security handler (RC4, revision 2) under a user password we do
    not give: written by hand, PDFium cannot encrypt."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
        b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -4 /O <" + b"6e" * 32 + b"> /U <" + b"a1" * 32 + b"> >>",
    ]
    return _write_pdf(path, objects, b"/Encrypt 4 0 R /ID [<" + b"00" * 16 + b"> <" + b"00" * 16 + b">]")


def _write_pdf(path: Path, objects: list[bytes], trailer_extra: bytes = b"") -> Path:
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer_extra + b" >>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(bytes(out))
    return path


def corrupt_pdf(path: Path) -> Path:
    """A PDF header, then noise: no object, no cross-reference table, nothing to rebuild."""
    rng = random.Random(7)
    path.write_bytes(b"%PDF-1.7\n" + bytes(rng.randrange(256) for _ in range(4096)))
    return path


def character_error_rate(expected: str, got: str) -> float:
    """Edits per character (Levenshtein, through jiwer), whitespace made single spaces on both sides."""
    import jiwer

    return float(jiwer.cer(" ".join(expected.split()), " ".join(got.split())))
