# syntax=docker/dockerfile:1
# uploads-consumer: a small runtime image, built in two stages.
#   docker build -t uploads-consumer .
#   docker run --rm --stop-timeout 45 -e ENCRYPTION_MASTER_KEY=... -e NATS_URL=nats://nats:4222 uploads-consumer
#   docker run --rm -e NATS_URL=... uploads-consumer status      # any other command
#   docker build --build-arg EXTRAS=transcribe -t uploads-consumer:voice .   # with transcode + transcribe
#   docker build --build-arg EXTRAS=transcribe,images -t uploads-consumer:media .   # + image (libvips) and video
#   docker build --build-arg EXTRAS=email -t uploads-consumer:email .   # with email (aiosmtplib); combine: EXTRAS=transcribe,email
#   docker build --build-arg EXTRAS=extract -t uploads-consumer:documents .   # extract: PDFium, and Tesseract (eng)

# --- build: install the package and its dependencies into a virtual environment -----------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the project's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY src ./src
# Optional extras, comma-separated: transcribe (faster-whisper and a bundled ffmpeg), media (ffmpeg only:
# transcode, video), images (libvips, bundled by the pyvips-binary wheel: image), audit (AUDIT_URL:
# aiosqlite and asyncpg), otel (tracing, off until OTEL_EXPORTER_OTLP_ENDPOINT is set), email, sms (nothing
# beyond the core), extract (pypdfium2, langdetect; the runtime stage then installs Tesseract).
ARG EXTRAS=""
RUN pip install --upgrade pip && pip install ".${EXTRAS:+[$EXTRAS]}" && pip check

# --- runtime: the virtual environment, libmagic and a non-root user, nothing else ----------
FROM python:3.11-slim AS runtime

# libmagic: python-magic reads each upload's content type from its first bytes. With the extract extra,
# Tesseract and its English model too (more languages: tesseract-ocr-deu, … and EXTRACT_OCR_LANGUAGES).
ARG EXTRAS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmagic1 \
    $(case ",$EXTRAS," in *,extract,*) echo tesseract-ocr tesseract-ocr-eng;; esac) \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it (the manifests use the same).
RUN groupadd --system --gid 10001 uploads \
 && useradd --system --uid 10001 --gid uploads --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin uploads \
 && mkdir -p /data/downloads \
 && chown -R uploads:uploads /data \
 && chmod 0700 /data/downloads

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DECRYPT_DOWNLOAD_PATH=/data/downloads \
    HTTP_PORT=8080 \
    LOG_FORMAT=json

# A named volume mounted here starts with this ownership.
VOLUME ["/data/downloads"]
WORKDIR /data
EXPOSE 8080
USER 10001:10001

# /healthz is 200 while the event loop and the fetch loop are alive; urlopen raises (exit 1)
# on anything else. The slim image has no curl, and needs none.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('HTTP_PORT') or '8080'), timeout=4)"]

# SIGTERM (docker stop) is a clean stop: fetching stops, in-flight work gets SHUTDOWN_GRACE, the
# rest is nak'ed, exit 0; the whole stop takes at most SHUTDOWN_GRACE + 15 s. docker stop's default
# of 10 s is too short: run with --stop-timeout 45 (SHUTDOWN_GRACE 30s + 15), or docker stop -t 45.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "uploads_consumer"]
CMD ["run"]
