"""The `image` processor with the real libvips: in-process for its behaviours, then through the daemon.

Every input is made here with libvips itself (pyvips): a phone photo with a real EXIF block (GPS
position, orientation), a CMYK JPEG, a Display P3 photo, an animated GIF, and hostile ones — a PNG
whose header declares 30000×30000, a truncated JPEG, an SVG that points at a file beside it.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import pyvips
from helpers import (
    dead_letters,
    peak_rss,
    publish_uploads,
    read_stream,
    refused_setting,
    results_by_event,
    wait_ready,
    wait_settled,
)
from hostile_media import interlaced_png
from prometheus_client import CollectorRegistry
from speech import context

from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.processors import ProcessorEnvironment, StepSkipped, load_processor
from uploads_consumer.processors.image import Image, ImageSettings

MiB = 1 << 20
ORANGE = (200, 100, 50)
GREEN = (0, 255, 0)


# ---- images made here --------------------------------------------------------------------------


def flat(width: int, height: int, colour=ORANGE) -> pyvips.Image:
    return (pyvips.Image.black(width, height, bands=3) + list(colour)).cast("uchar").copy(interpretation="srgb")


def phone_photo(path: Path) -> Path:
    """400×200 stored, a green square in its top-left corner, EXIF orientation 6 (shown turned a
    quarter clockwise: 200×400, the square top-right), a GPS position and a camera make."""
    image = flat(400, 200).draw_rect(list(GREEN), 0, 0, 50, 50, fill=True).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Make", "PhoneMaker")
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd3-GPSLatitudeRef", "N")
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd3-GPSLatitude", "48/1 51/1 29/1")
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd3-GPSLongitudeRef", "E")
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd3-GPSLongitude", "2/1 17/1 40/1")
    image.jpegsave(str(path), Q=95)
    stored = pyvips.Image.new_from_file(str(path))
    assert stored.get("exif-ifd3-GPSLatitude").startswith("48/1 51/1 29/1"), "the photo carries its position"
    return path


def cmyk_jpeg(path: Path) -> Path:
    flat(300, 150).icc_transform("cmyk", input_profile="srgb").jpegsave(str(path), Q=95)
    assert pyvips.Image.new_from_file(str(path)).interpretation == "cmyk"
    return path


def p3_jpeg(path: Path) -> Path:
    """ORANGE in Display P3, with the P3 profile embedded: its stored numbers are not ORANGE's."""
    image = flat(300, 150).icc_transform("p3", input_profile="srgb")
    image.jpegsave(str(path), Q=95)
    assert abs(image(5, 5)[0] - ORANGE[0]) > 8
    return path


def animated_gif(path: Path, frames=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> Path:
    strip = pyvips.Image.arrayjoin([flat(120, 80, colour) for colour in frames], across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 80)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * len(frames))
    strip.gifsave(str(path))
    return path


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A PNG of a few hundred bytes whose header declares width × height pixels (900 MP, 2.7 GB as RGB):
    a few rows of real data, the rest missing. Decoding it would be the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" + bytes(3 * width))  # one row: its filter byte, then black pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    assert path.stat().st_size < 1000
    return path


def truncated_jpeg(path: Path) -> Path:
    whole = flat(640, 480).draw_circle([0, 0, 255], 320, 240, 100, fill=True).jpegsave_buffer(Q=90)
    path.write_bytes(whole[: len(whole) // 2])
    return path


def large_jpeg(path: Path, width: int, height: int) -> Path:
    """A photo-sized JPEG of smooth gradients (a few MB, not the tens a noise image would take)."""
    xy = pyvips.Image.xyz(width, height)
    image = xy[0].bandjoin([xy[1], xy[0] + xy[1]]) % 256
    image.cast("uchar").copy(interpretation="srgb").jpegsave(str(path), Q=85)
    return path


# ---- the processor, in-process -------------------------------------------------------------------

VARIABLES = [f"IMAGE_{name.upper()}" for name in ImageSettings.model_fields]


async def imager(monkeypatch, tmp_path: Path, **variables: str) -> Image:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = ProcessorEnvironment(
        download_path=tmp_path / "downloads", chain=("image",), max_retry_delay=30, registry=CollectorRegistry()
    )
    loaded = load_processor("image", env)
    await loaded.start()
    assert isinstance(loaded.instance, Image)
    return loaded.instance


async def render(processor: Image, path: Path, tmp_path: Path, content_type: str, name: str | None = None):
    ctx = context(path, tmp_path / "work", name, content_type=content_type)
    ctx.download_path = tmp_path / "downloads"
    ctx.current = "image"
    await processor.run(ctx)
    return ctx.outputs["image"]


def opened(rendition: dict) -> pyvips.Image:
    return pyvips.Image.new_from_file(rendition["path"])


def near(pixel, colour, tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


async def test_each_size_is_a_rendition_of_that_longest_side_and_none_is_enlarged(tmp_path, monkeypatch):
    photo = tmp_path / "wide.jpg"
    flat(1600, 900).jpegsave(str(photo))
    processor = await imager(monkeypatch, tmp_path, IMAGE_SIZES="2000,320,1280")
    out = await render(processor, photo, tmp_path, "image/jpeg")
    assert (out["format"], out["width"], out["height"]) == ("jpeg", 1600, 900)
    sizes = [(r["size"], r["width"], r["height"]) for r in out["renditions"]]
    assert sizes == [(320, 320, 180), (1280, 1280, 720), (2000, 1600, 900)], "2000 is wider than the photo: as it is"
    for rendition in out["renditions"]:
        written = opened(rendition)
        assert (written.width, written.height, written.get("vips-loader")) == (
            rendition["width"],
            rendition["height"],
            "webpload",
        )
        assert Path(rendition["path"]).name == f"wide.jpg.{rendition['size']}.webp"
        assert Path(rendition["path"]).stat().st_size == rendition["bytes"]
        assert (
            Path(rendition["path"]).parent
            == tmp_path / "downloads" / "user@example.com" / Path(rendition["path"]).parent.name
        )


async def test_a_phone_photo_is_turned_upright_and_its_gps_position_and_all_metadata_are_gone(tmp_path, monkeypatch):
    photo = phone_photo(tmp_path / "IMG_0001.jpg")
    out = await render(await imager(monkeypatch, tmp_path), photo, tmp_path, "image/jpeg")
    assert (out["width"], out["height"]) == (200, 400), "reported upright"
    for rendition in out["renditions"]:
        written = opened(rendition)
        assert written.height == 2 * written.width, "upright: taller than wide"
        assert near(written(written.width - 3, 3), GREEN), "the corner square is now top-right"
        assert near(written(3, 3), ORANGE)
        kept = [f for f in written.get_fields() if f.startswith(("exif", "xmp", "iptc", "icc", "orientation"))]
        assert kept == [], kept
        raw = Path(rendition["path"]).read_bytes()
        assert b"EXIF" not in raw and b"Exif" not in raw and b"XMP " not in raw and b"ICCP" not in raw
        assert b"PhoneMaker" not in raw


@pytest.mark.parametrize("made", [cmyk_jpeg, p3_jpeg], ids=["cmyk", "display-p3"])
async def test_colour_from_another_space_comes_out_as_the_same_colour_in_srgb(tmp_path, monkeypatch, made):
    photo = made(tmp_path / "colour.jpg")
    out = await render(await imager(monkeypatch, tmp_path, IMAGE_SIZES="100"), photo, tmp_path, "image/jpeg")
    written = opened(out["renditions"][0])
    assert written.bands == 3 and written.interpretation == "srgb"
    assert near(written(50, 25), ORANGE), written(50, 25)


async def test_a_decompression_bomb_is_too_large_from_its_header_without_decoding(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png")
    processor = await imager(monkeypatch, tmp_path)
    began = time.monotonic()
    with pytest.raises(PermanentError) as caught:
        await render(processor, bomb, tmp_path, "image/png")
    assert time.monotonic() - began < 2, "refused from the header, not after a decode"
    assert caught.value.error_class is ErrorClass.TOO_LARGE
    assert caught.value.reason == "image: bomb.png is 30000×30000, 900000000 pixels, over IMAGE_MAX_PIXELS (100000000)"


async def test_the_pixel_limit_is_the_operators(tmp_path, monkeypatch):
    photo = tmp_path / "photo.jpg"
    flat(1000, 1000).jpegsave(str(photo))
    processor = await imager(monkeypatch, tmp_path, IMAGE_MAX_PIXELS="999999")
    with pytest.raises(PermanentError) as caught:
        await render(processor, photo, tmp_path, "image/jpeg")
    assert caught.value.error_class is ErrorClass.TOO_LARGE


async def test_a_truncated_jpeg_is_unsupported_media_not_a_grey_half(tmp_path, monkeypatch):
    with pytest.raises(PermanentError) as caught:
        await render(await imager(monkeypatch, tmp_path), truncated_jpeg(tmp_path / "cut.jpg"), tmp_path, "image/jpeg")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert caught.value.reason == "image: cannot decode cut.jpg: VipsJpeg: premature end of JPEG image"
    assert not (tmp_path / "downloads").exists(), "no rendition of it was written"


async def test_bytes_that_are_not_the_image_they_claim_are_not_read_by_another_loader(tmp_path, monkeypatch):
    matrix = tmp_path / "photo.png"
    matrix.write_text("2 2\n1 2\n3 4\n")  # libvips' own matrix format: read only as what it says it is
    with pytest.raises(PermanentError) as caught:
        await render(await imager(monkeypatch, tmp_path), matrix, tmp_path, "image/png")
    assert caught.value.error_class is ErrorClass.UNSUPPORTED_MEDIA
    assert "photo.png is image/png but reads as matrix" in caught.value.reason


async def test_an_animated_gif_gives_its_first_frame_unless_animation_is_kept(tmp_path, monkeypatch):
    gif = animated_gif(tmp_path / "wave.gif")
    first = await render(await imager(monkeypatch, tmp_path, IMAGE_SIZES="60"), gif, tmp_path, "image/gif")
    assert (first["pages"], first["animated"]) == (3, False)
    still = opened(first["renditions"][0])
    assert (still.width, still.height) == (60, 40)
    assert (still.get("n-pages") if still.get_typeof("n-pages") else 1) == 1
    assert near(still(30, 20), (255, 0, 0))

    kept = await render(
        await imager(monkeypatch, tmp_path, IMAGE_SIZES="60", IMAGE_ANIMATED="true"), gif, tmp_path, "image/gif"
    )
    assert (kept["animated"], kept["renditions"][0]["width"], kept["renditions"][0]["height"]) == (True, 60, 40)
    frames = pyvips.Image.new_from_file(kept["renditions"][0]["path"], n=-1)
    assert frames.get("n-pages") == 3 and frames.height == 3 * 40
    assert near(frames(30, 40 + 20), (0, 255, 0)) and near(frames(30, 80 + 20), (0, 0, 255))


async def test_animation_frames_count_against_the_pixel_limit(tmp_path, monkeypatch):
    gif = animated_gif(tmp_path / "wave.gif")  # 120×80 = 9600 pixels a frame, 28800 in all
    processor = await imager(monkeypatch, tmp_path, IMAGE_ANIMATED="true", IMAGE_MAX_PIXELS="20000")
    with pytest.raises(PermanentError) as caught:
        await render(processor, gif, tmp_path, "image/gif")
    assert caught.value.error_class is ErrorClass.TOO_LARGE and "in 3 frames" in caught.value.reason


SVG_WITH_A_NEIGHBOUR = b"""<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
 width="100" height="100"><rect width="100" height="100" fill="white"/>
 <image x="0" y="0" width="100" height="100" xlink:href="secret.png"/></svg>"""


async def test_svg_is_skipped_unless_enabled(tmp_path, monkeypatch):
    drawing = tmp_path / "drawing.svg"
    drawing.write_bytes(SVG_WITH_A_NEIGHBOUR)
    with pytest.raises(StepSkipped) as caught:
        await render(await imager(monkeypatch, tmp_path), drawing, tmp_path, "image/svg+xml")
    assert caught.value.reason == "image: drawing.svg is SVG, not rasterised (IMAGE_SVG=false)"


async def test_an_enabled_svg_is_rasterised_without_reading_the_file_beside_it(tmp_path, monkeypatch):
    # The work folder holds other uploads' plaintext: an SVG must not be able to draw one of them in.
    flat(100, 100, (255, 0, 0)).pngsave(str(tmp_path / "secret.png"))
    drawing = tmp_path / "drawing.svg"
    drawing.write_bytes(SVG_WITH_A_NEIGHBOUR)
    processor = await imager(monkeypatch, tmp_path, IMAGE_SVG="true", IMAGE_SIZES="100")
    out = await render(processor, drawing, tmp_path, "image/svg+xml")
    written = opened(out["renditions"][0])
    assert (out["format"], written.width, written.height) == ("svg", 100, 100)
    assert near(written(50, 50), (255, 255, 255)), "white: the neighbouring red file was not read"


async def test_an_image_over_its_time_limit_stops_and_the_failure_is_transient(tmp_path, monkeypatch):
    photo = large_jpeg(tmp_path / "photo.jpg", 4000, 3000)
    processor = await imager(monkeypatch, tmp_path, IMAGE_TIMEOUT="1ms")
    with pytest.raises(RetryableError) as caught:
        await render(processor, photo, tmp_path, "image/jpeg")
    assert caught.value.reason == "image: photo.jpg took longer than IMAGE_TIMEOUT (0.001s)"


@pytest.mark.parametrize(("kind", "loader", "extension"), [("avif", "heifload", "avif"), ("jpeg", "jpegload", "jpg")])
async def test_other_rendition_formats(tmp_path, monkeypatch, kind, loader, extension):
    photo = phone_photo(tmp_path / "photo.jpg")
    out = await render(await imager(monkeypatch, tmp_path, IMAGE_FORMAT=kind), photo, tmp_path, "image/jpeg")
    for rendition in out["renditions"]:
        written = opened(rendition)
        assert (rendition["format"], written.get("vips-loader"), Path(rendition["path"]).suffix) == (
            kind,
            loader,
            f".{extension}",
        )
        assert not [f for f in written.get_fields() if f.startswith(("exif", "xmp", "icc"))]


async def test_an_image_type_libvips_is_not_trusted_with_is_skipped(tmp_path, monkeypatch):
    bitmap = tmp_path / "old.bmp"
    bitmap.write_bytes(b"BM" + bytes(100))
    with pytest.raises(StepSkipped, match="image/bmp, not a format renditions are made of"):
        await render(await imager(monkeypatch, tmp_path), bitmap, tmp_path, "image/bmp")


@pytest.mark.parametrize(
    ("variables", "variable", "words"),
    [
        ({"IMAGE_SIZES": "big"}, "IMAGE_SIZES", "pixel sizes such as 320,1280"),
        ({"IMAGE_SIZES": "0,320"}, "IMAGE_SIZES", "between 1 and 16384"),
        ({"IMAGE_FORMAT": "gif"}, "IMAGE_FORMAT", "'webp', 'avif' or 'jpeg'"),
        ({"IMAGE_QUALITY": "101"}, "IMAGE_QUALITY", "less than or equal to 100"),
        ({"IMAGE_TIMEOUT": "soon"}, "IMAGE_TIMEOUT", "expected a duration"),
        ({"IMAGE_SVG": "perhaps"}, "IMAGE_SVG", "boolean"),
    ],
)
def test_each_invalid_setting_is_a_configuration_error_naming_its_variable(monkeypatch, variables, variable, words):
    refused = refused_setting(monkeypatch, "image", ImageSettings, **variables)
    assert refused.variable == variable
    assert words in refused.reason


# ---- through the daemon ----------------------------------------------------------------------------


async def test_images_through_the_daemon_renditions_dead_letters_skips_and_bounded_memory(
    tmp_path, settings_for, start_daemon, nats_server, downloads
):
    """One daemon: a warm-up photo, then a 50-megapixel JPEG (shrunk while it loads: its 150 MB bitmap
    never exists), a phone photo, a CMYK JPEG, a decompression bomb, a truncated JPEG and an SVG."""
    made = tmp_path / "in"
    made.mkdir()
    warm = made / "warm.jpg"
    flat(800, 600).jpegsave(str(warm))
    big = large_jpeg(made / "big.jpg", 8160, 6120)  # 50 MP, as a phone's main camera takes them
    files = [
        big,
        phone_photo(made / "IMG_0001.jpg"),
        cmyk_jpeg(made / "print.jpg"),
        bomb_png(made / "bomb.png"),
        truncated_jpeg(made / "cut.jpg"),
        made / "drawing.svg",
    ]
    files[-1].write_bytes(SVG_WITH_A_NEIGHBOUR)
    daemon = start_daemon(PROCESSORS="save,image")
    await wait_ready(daemon, nats_server.url)
    settings = settings_for()
    await publish_uploads(settings, [warm])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    baseline = peak_rss(daemon.proc.pid)
    events = await publish_uploads(settings, files)
    await wait_settled(nats_server.url, 1 + len(files), daemon=daemon, timeout=120)
    growth = peak_rss(daemon.proc.pid) - baseline
    assert daemon.terminate() == 0

    results = {e: r[0] for e, r in results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED")).items()}
    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    big_event, phone, cmyk, bomb, cut, svg = (e.event_id for e in events)
    assert set(dead) == {bomb, cut}
    assert dead[bomb]["Uploads-Error-Class"] == "too_large"
    assert dead[cut]["Uploads-Error-Class"] == "unsupported_media"

    out = results[big_event]["outputs"]["image"]
    assert (out["width"], out["height"]) == (8160, 6120)
    assert [(r["width"], r["height"]) for r in out["renditions"]] == [(320, 240), (1280, 960)]
    print(f"peak RSS baseline {baseline / MiB:.1f} MiB, growth over a 50 MP JPEG and the rest {growth / MiB:.1f} MiB")
    # What it takes (about 30-55 MiB on this machine): the JPEG decoded a strip at a time at a quarter
    # of its size, the 1280 px rendition kept for the 320 px one, libwebp's buffers, two images at once.
    assert growth < 100 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB (the decoded 50 MP bitmap alone is 143 MiB)"

    phone_out = results[phone]["outputs"]["image"]
    assert results[phone]["processors"] == ["save", "image"]
    for rendition in phone_out["renditions"]:
        path = Path(rendition["path"])
        assert path.parent == downloads / "user@example.com" / events[1].file_uuid
        assert b"Exif" not in path.read_bytes() and opened(rendition).height > opened(rendition).width
    assert (downloads / "user@example.com" / events[1].file_uuid / "IMG_0001.jpg").exists(), "saved as it came"
    assert near(opened(results[cmyk]["outputs"]["image"]["renditions"][0])(100, 50), ORANGE)

    assert results[svg]["content_type"] == "image/svg+xml"
    assert (results[svg]["processors"], results[svg]["skipped"]) == (["save"], ["image"])
    assert "image" not in results[svg]["outputs"]
    skip_lines = [json.loads(line) for line in daemon.log_text().splitlines() if '"step skipped"' in line]
    assert [line["reason"] for line in skip_lines] == ["image: drawing.svg is SVG, not rasterised (IMAGE_SVG=false)"]


async def test_interlaced_pngs_decoded_whole_are_bounded_by_max_memory_and_the_daemons_rss_stays_flat(
    tmp_path, settings_for, start_daemon, nats_server
):
    """The expert review's file (issue 28): an Adam7 16-bit RGBA PNG of 9999×9999, under IMAGE_MAX_PIXELS,
    800 MB once decoded, sent twice at IMAGE_CONCURRENCY=2 (it took the daemon to 1.9 GB). Refused from
    its header; a small interlaced PNG still gets its renditions."""
    made = tmp_path / "in"
    made.mkdir()
    warm = made / "warm.jpg"
    flat(800, 600).jpegsave(str(warm))
    bombs = [interlaced_png(made / f"scan-{i}.png") for i in range(2)]
    small = interlaced_png(made / "icon.png", 640, 480)  # 2.3 MiB decoded
    daemon = start_daemon(PROCESSORS="image", IMAGE_CONCURRENCY="2", NATS_RESULT_SUBJECT="file.processed")
    await wait_ready(daemon, nats_server.url)
    settings = settings_for()
    await publish_uploads(settings, [warm])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    baseline = peak_rss(daemon.proc.pid)
    events = await publish_uploads(settings, [*bombs, small])
    await wait_settled(nats_server.url, 4, daemon=daemon, timeout=120)
    growth = peak_rss(daemon.proc.pid) - baseline
    assert daemon.terminate() == 0
    print(f"peak RSS baseline {baseline / MiB:.1f} MiB, growth over two 800 MB interlaced PNGs {growth / MiB:.1f} MiB")

    dead = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    assert set(dead) == {events[0].event_id, events[1].event_id}
    for headers, bomb in zip(dead.values(), bombs, strict=True):
        assert headers["Uploads-Error-Class"] == "resource_limit"
        assert headers["Uploads-Deliveries"] == "1", "dead-lettered at once, never retried"
        assert headers["Uploads-Error"] == (
            f"image: {bomb.name} is interlaced, so decoded whole: 9999×9999, 4 bands of 16 bits, 799840008 bytes, "
            "over IMAGE_MAX_MEMORY (134217728); raise IMAGE_MAX_MEMORY to process it"
        )
    result = results_by_event(await read_stream(nats_server.url, "FILE_PROCESSED"))[events[2].event_id][0]
    assert [(r["width"], r["height"]) for r in result["outputs"]["image"]["renditions"]] == [(320, 240), (640, 480)]
    assert growth < 50 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB"
