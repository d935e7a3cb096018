"""The built-in `image` processor: web renditions of an uploaded image, made by libvips, metadata stripped.

libvips (pyvips, with the pyvips-binary wheel: libvips and its format libraries bundled) reads an
image a strip at a time and shrinks it while it loads where the format allows (a JPEG is decoded at
1/2, 1/4 or 1/8 of its size), so a 50-megapixel photo never becomes a 150 MB bitmap. The largest
rendition is made from the upload, the smaller ones from it. Each is turned upright by its EXIF
orientation, converted to sRGB, and written with no metadata at all (no EXIF, so no GPS position;
no XMP, IPTC or ICC profile) as `{name}.{size}.{format}` beside the saved upload.

The input is hostile until proven otherwise:
- the loaders libvips marks untrusted (not fuzzed) are blocked, and only those of the common web
  formats are accepted at all;
- the header's width × height is checked against IMAGE_MAX_PIXELS before a pixel is decoded;
- decoding stops at the first error: a truncated or corrupt image is `unsupported_media`;
- each image has IMAGE_TIMEOUT: libvips stops at its next strip of pixels once it is over (a
  format that must be decoded whole first — interlaced PNG, progressive JPEG — after that decode,
  which IMAGE_MAX_PIXELS bounds);
- SVG is rasterised only with IMAGE_SVG=true, and then from an open file, never from its path:
  librsvg lets an SVG loaded from a path embed the files beside it, and the work folder holds other
  uploads' plaintext.

libvips runs in threads of the processor's own (IMAGE_CONCURRENCY of them), not on the event loop
nor in the default executor that `save` and the others use for their short jobs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from uploads_consumer.config import PositiveDuration, PositiveSize
from uploads_consumer.errors import (
    ConfigError,
    ErrorClass,
    PermanentError,
    ProcessorTimeout,
    ResourceLimit,
    RetryableError,
    one_line,
)
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
from uploads_consumer.processors.save import place_bytes

log = get_logger("uploads_consumer.processors.image")

MAX_SIDE = 16384  # the largest rendition that may be asked for (WebP's own limit)
SVG = "image/svg+xml"
# The formats renditions are made of, and the libvips loader each must be read by (checked after the
# header is read: a file whose bytes are not what its type says is refused, not read by another).
LOADERS = {
    "image/jpeg": "jpegload",
    "image/png": "pngload",
    "image/gif": "gifload",
    "image/webp": "webpload",
    "image/heic": "heifload",
    "image/heif": "heifload",
    "image/avif": "heifload",
    "image/tiff": "tiffload",
    SVG: "svgload",
}
ANIMATED_LOADERS = frozenset({"gifload", "webpload"})
EXTENSIONS = {"webp": "webp", "avif": "avif", "jpeg": "jpg"}
_ORIENTATIONS_THAT_SWAP = frozenset({5, 6, 7, 8})  # EXIF: the upright image is the stored one turned a quarter


def _pixel_sizes(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        sizes = tuple(sorted({int(str(item).strip()) for item in items if str(item).strip()}))
    except ValueError:
        raise ValueError("expected pixel sizes such as 320,1280") from None
    if not sizes:
        raise ValueError("expected at least one pixel size, e.g. 320,1280")
    if sizes[0] < 1 or sizes[-1] > MAX_SIDE:
        raise ValueError(f"each size must be between 1 and {MAX_SIDE} pixels")
    return sizes


PixelSizes = Annotated[tuple[int, ...], NoDecode, BeforeValidator(_pixel_sizes)]


class ImageSettings(ProcessorSettings):
    sizes: PixelSizes = Field(
        default=(320, 1280), description="renditions: the longest side in pixels of each (never enlarged)"
    )
    format: Literal["webp", "avif", "jpeg"] = Field(default="webp", description="webp, avif or jpeg")
    quality: int = Field(default=80, ge=1, le=100, description="the encoder's quality, 1-100")
    max_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="larger images (width × height from the header, all frames when animated) are too_large, undecoded",
    )
    max_memory: PositiveSize = Field(
        default="128MiB",
        validate_default=True,
        description="an interlaced image (decoded whole) larger than this once decoded (width × height × bands × bytes per sample, from the header) is resource_limit, undecoded",
    )
    animated: bool = Field(default=False, description="keep GIF and WebP animations (webp only); else the first frame")
    svg: bool = Field(default=False, description="rasterise SVG (without access to any other file); else skip it")
    timeout: PositiveDuration = Field(
        default="30s",
        validate_default=True,
        description="longest one image may take; longer is retried PROCESSOR_TIMEOUT_RETRIES times, then processor_timeout",
    )
    concurrency: int = Field(default=2, ge=1, le=64, description="images worked on at once in this process")


@dataclass(frozen=True)
class Rendition:
    size: int
    width: int
    height: int
    data: bytes


@dataclass(frozen=True)
class Rendered:
    """What was read from the upload (upright), and the encoded renditions."""

    format: str
    width: int
    height: int
    pages: int
    animated: bool
    renditions: list[Rendition]


@dataclass(frozen=True)
class Recipe:
    """How to render: everything the worker thread needs, none of it shared with the loop."""

    sizes: tuple[int, ...]
    format: str
    quality: int
    max_pixels: int
    animated: bool
    timeout: float
    timeout_variable: str
    max_pixels_variable: str
    max_memory: int = 128 << 20
    max_memory_variable: str = "IMAGE_MAX_MEMORY"


class Watch:
    """libvips' progress signal, turned into a time limit: an image over its deadline, or whose
    message was cancelled, is killed at its next strip of pixels."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.stop = threading.Event()
        self.fired = False

    def watch(self, image: Any) -> Any:
        image.set_progress(True)
        image.signal_connect("eval", self._on_eval)
        return image

    def _on_eval(self, image: Any, _progress: Any) -> None:
        if self.stop.is_set() or time.monotonic() > self.deadline:
            self.fired = True
            image.set_kill(True)


def _load_options(loader: str, animated: bool) -> str:
    # thumbnail_source passes its option string to the loader but not its own `fail_on` argument
    # (libvips 8.18): without it here, a truncated JPEG would pass with its missing part grey.
    return "fail_on=error" + (",n=-1" if animated and loader in ANIMATED_LOADERS else "")


def render(path: Path, name: str, content_type: str, recipe: Recipe, watch: Watch) -> Rendered:
    """Read the image at `path` (upload `name`, of `content_type`) and encode its renditions. Blocking."""
    import pyvips

    try:
        header = pyvips.Image.new_from_source(
            pyvips.Source.new_from_file(str(path)), "", access="sequential", fail_on="error"
        )
        loader = str(header.get("vips-loader")).removesuffix("_source")
        if loader != LOADERS.get(content_type):
            raise PermanentError(
                ErrorClass.UNSUPPORTED_MEDIA,
                f"image: {name} is {content_type} but reads as {loader.removesuffix('load')}",
            )
        pages = int(header.get("n-pages")) if header.get_typeof("n-pages") else 1
        animated = recipe.animated and pages > 1 and loader in ANIMATED_LOADERS
        pixels = header.width * header.height * (pages if animated else 1)
        if pixels > recipe.max_pixels:
            frames = f" in {pages} frames" if animated else ""
            raise PermanentError(
                ErrorClass.TOO_LARGE,
                f"image: {name} is {header.width}×{header.height}{frames}, {pixels} pixels, "
                f"over {recipe.max_pixels_variable} ({recipe.max_pixels})",
            )
        check_whole_decode(header, name, pages if animated else 1, recipe)
        orientation = int(header.get("orientation")) if header.get_typeof("orientation") else 1
        turned = orientation in _ORIENTATIONS_THAT_SWAP
        width, height = (header.height, header.width) if turned else (header.width, header.height)
        # An embedded profile (Display P3, Adobe RGB, a printer's CMYK) is converted from; without one the
        # pixels are taken as sRGB already (an ICC transform from sRGB to itself cost half the time).
        managed = bool(header.get_typeof("icc-profile-data")) or header.interpretation == "cmyk"
        renditions = _renditions(path, loader, animated, managed, recipe, watch)
        return Rendered(loader.removesuffix("load"), width, height, pages, animated, renditions)
    except pyvips.Error as exc:
        if watch.fired:
            raise ProcessorTimeout(
                recipe.timeout_variable,
                f"image: {name} took longer than {recipe.timeout_variable} ({recipe.timeout:g}s)",
            ) from None
        raise PermanentError(
            ErrorClass.UNSUPPORTED_MEDIA, f"image: cannot decode {name}: {_libvips_says(exc, path, name)}"
        ) from None


SAMPLE_BYTES = {"uchar": 1, "char": 1, "ushort": 2, "short": 2, "uint": 4, "int": 4, "float": 4}
SAMPLE_BYTES |= {"double": 8, "complex": 8, "dpcomplex": 16}


def decoded_bytes(header: Any, frames: int = 1) -> int:
    """What the whole image takes once decoded, from its header: width × height × bands × bytes per
    sample (× frames)."""
    return int(header.width * header.height * header.bands * SAMPLE_BYTES.get(str(header.format), 8) * frames)


def check_whole_decode(header: Any, name: str, frames: int, recipe: Recipe) -> None:
    """An interlaced image (an Adam7 PNG, a progressive JPEG) is decoded whole before it can be shrunk:
    its decoded size must be within IMAGE_MAX_MEMORY, or it is `resource_limit` before a pixel is read.
    Every other image is read a strip at a time, whatever its size (IMAGE_MAX_PIXELS bounds it)."""
    if not (header.get_typeof("interlaced") and header.get("interlaced")):
        return
    needed = decoded_bytes(header, frames)
    if needed > recipe.max_memory:
        bits = 8 * SAMPLE_BYTES.get(str(header.format), 8)
        raise ResourceLimit(
            recipe.max_memory_variable,
            f"image: {name} is interlaced, so decoded whole: {header.width}×{header.height}, {header.bands} "
            f"bands of {bits} bits, {needed} bytes, over {recipe.max_memory_variable} ({recipe.max_memory}); "
            f"raise {recipe.max_memory_variable} to process it",
        )


def _renditions(
    path: Path, loader: str, animated: bool, managed: bool, recipe: Recipe, watch: Watch
) -> list[Rendition]:
    import pyvips

    largest, *smaller = sorted(recipe.sizes, reverse=True)
    # Shrink-on-load to the largest size, upright (thumbnail applies the EXIF orientation), and from
    # its embedded profile to sRGB when it has one.
    image = pyvips.Image.thumbnail_source(
        pyvips.Source.new_from_file(str(path)),
        largest,
        option_string=_load_options(loader, animated),
        height=largest,
        size="down",
        **({"output_profile": "srgb"} if managed else {}),
    )
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if smaller:  # the smaller renditions come from the largest, decoded once and kept (size² pixels)
        image = watch.watch(image).copy_memory()
    out = [_encode(watch.watch(image), largest, recipe)]
    for size in smaller:
        out.append(_encode(watch.watch(image.thumbnail_image(size, height=size, size="down")), size, recipe))
    return sorted(out, key=lambda r: r.size)


def _encode(image: Any, size: int, recipe: Recipe) -> Rendition:
    import pyvips

    strip = pyvips.enums.ForeignKeep.NONE  # no EXIF (GPS), XMP, IPTC or ICC profile: pixels only
    if recipe.format == "webp":
        data = image.webpsave_buffer(Q=recipe.quality, keep=strip)
    elif recipe.format == "avif":
        data = image.heifsave_buffer(Q=recipe.quality, compression="av1", keep=strip)
    else:
        data = image.jpegsave_buffer(Q=recipe.quality, keep=strip, optimize_coding=True)
    page_height = image.get("page-height") if image.get_typeof("page-height") else image.height
    return Rendition(size, image.width, page_height, bytes(data))


def _libvips_says(exc: Any, path: Path, name: str) -> str:
    """libvips' own reason on one line, without the private file's path."""
    lines = [line.strip() for line in f"{exc.detail or ''}\n{exc.message or ''}".splitlines()]
    useful = [line for line in lines if line and not line.startswith("unable to call")]
    return one_line((useful[0] if useful else "libvips failed").replace(str(path), name), 240)


class Image(Processor):
    """Web renditions of images (libvips): IMAGE_SIZES longest sides, upright, sRGB, no metadata.

    Written beside the saved upload as `{name}.{size}.{format}`; listed in the outputs. Images over
    IMAGE_MAX_PIXELS are too_large, corrupt ones unsupported_media; SVG is skipped unless IMAGE_SVG.
    """

    settings_class = ImageSettings
    needs = Need.PLAINTEXT
    content_types = ("image/*",)
    settings: ImageSettings

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        super().__init__(name, settings, env)
        prefix = variable_prefix(name)
        config = self.settings
        self.recipe = Recipe(
            sizes=config.sizes,
            format=config.format,
            quality=config.quality,
            max_pixels=config.max_pixels,
            animated=config.animated and config.format == "webp",
            timeout=config.timeout,
            timeout_variable=f"{prefix}TIMEOUT",
            max_pixels_variable=f"{prefix}MAX_PIXELS",
            max_memory=config.max_memory,
            max_memory_variable=f"{prefix}MAX_MEMORY",
        )
        self._prefix = prefix
        self._workers: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        try:
            import pyvips
        except (ImportError, OSError) as exc:
            raise ConfigError(
                "PROCESSORS", f"{self.name} needs libvips: pip install 'uploads-consumer[images]' ({exc})"
            ) from None
        if not pyvips.at_least_libvips(8, 15):
            raise ConfigError(
                "PROCESSORS", f"{self.name} needs libvips 8.15 or later, found {pyvips.version(0)}.{pyvips.version(1)}"
            )
        # Loaders that have not been fuzzed (ImageMagick, PDF, FITS, CSV, ... and SVG) refuse to run; the
        # operation cache is off: it would keep decoded images, and files, of past uploads.
        pyvips.block_untrusted_set(True)
        if self.settings.svg:
            pyvips.operation_block_set("VipsForeignLoadSvg", False)
        pyvips.cache_set_max(0)
        pyvips.cache_set_max_mem(0)
        pyvips.cache_set_max_files(0)
        try:
            _encode(pyvips.Image.black(2, 2, bands=3), 2, self.recipe)
        except pyvips.Error:
            raise ConfigError(f"{self._prefix}FORMAT", f"this libvips cannot write {self.settings.format}") from None
        self._workers = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix=self.name)
        log.info(
            "image: using libvips",
            version=f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
            sizes=list(self.recipe.sizes),
            format=self.recipe.format,
            svg=self.settings.svg,
        )

    async def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._workers = None

    async def run(self, ctx: ProcessingContext) -> None:
        if self._workers is None:
            raise RetryableError("image: not started")
        name = ctx.metadata.clean_filename
        kind = ctx.content_type.split(";", 1)[0].strip().lower()
        if kind == SVG and not self.settings.svg:
            raise StepSkipped(f"image: {name} is SVG, not rasterised ({self._prefix}SVG=false)")
        if kind not in LOADERS:
            raise StepSkipped(f"image: {name} is {kind}, not a format renditions are made of")
        if ctx.size == 0:
            raise PermanentError(ErrorClass.UNSUPPORTED_MEDIA, f"image: {name} is empty")
        watch = Watch(self.recipe.timeout)
        job = asyncio.get_running_loop().run_in_executor(self._workers, self._render_and_place, ctx, kind, watch)
        try:
            rendered, paths = await job
        except asyncio.CancelledError:
            watch.stop.set()  # a job already running stops at its next strip of pixels
            raise
        ctx.report("format", rendered.format)
        ctx.report("width", rendered.width)
        ctx.report("height", rendered.height)
        if rendered.pages > 1:
            ctx.report("pages", rendered.pages)
            ctx.report("animated", rendered.animated)
        ctx.report(
            "renditions",
            [
                {
                    "size": r.size,
                    "width": r.width,
                    "height": r.height,
                    "format": self.recipe.format,
                    "bytes": len(r.data),
                    "path": str(path),
                }
                for r, path in zip(rendered.renditions, paths, strict=True)
            ],
        )

    def _render_and_place(self, ctx: ProcessingContext, kind: str, watch: Watch) -> tuple[Rendered, list[Path]]:
        """In a worker thread: the time limit starts when the work does, not while it waits for a thread."""
        watch.deadline = time.monotonic() + self.recipe.timeout
        name = ctx.metadata.clean_filename
        rendered = render(ctx.plaintext_path, name, kind, self.recipe, watch)
        extension = EXTENSIONS[self.recipe.format]
        paths = [
            place_bytes(
                ctx.download_path,
                ctx.work_dir,
                ctx.event.email,
                ctx.event.file_uuid,
                f"{name}.{r.size}.{extension}",
                r.data,
            )
            for r in rendered.renditions
        ]
        return rendered, paths
