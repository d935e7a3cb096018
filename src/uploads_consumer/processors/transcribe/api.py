"""The `openai` backend of `transcribe`: any server that speaks OpenAI's `POST /audio/transcriptions`.

OpenAI itself, Groq, or a self-hosted speaches, whisper.cpp server or vLLM. The audio is streamed
from disk in a multipart request asking for `verbose_json` (segments with timestamps). One
long-lived HTTP session, made at start. Redirects are not followed. 408, 429, 5xx, timeouts and
connection errors are transient (`Retry-After` is honoured, capped at the longest RETRY_BACKOFF);
any other refusal dead-letters the upload as `processor_failed`. The API key is sent only in the
Authorization header and never appears in a log line or a reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from uploads_consumer import tracing
from uploads_consumer.config import MIN_RETRY_DELAY
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError, one_line
from uploads_consumer.observability import get_logger
from uploads_consumer.processors.transcribe.settings import TranscribeSettings
from uploads_consumer.processors.transcribe.transcript import Segment, Transcript

log = get_logger("uploads_consumer.processors.transcribe")

MAX_RESPONSE_BYTES = 32 << 20
CONNECT_TIMEOUT = 30.0
LOOPBACK = ("localhost", "127.0.0.1", "::1")

# OpenAI answers with the language's English name ("english"); the result message carries its
# code ("en"). Whisper's languages, name → code:
_LANGUAGES = (
    "en english,zh chinese,de german,es spanish,ru russian,ko korean,fr french,ja japanese,pt portuguese,"
    "tr turkish,pl polish,ca catalan,nl dutch,ar arabic,sv swedish,it italian,id indonesian,hi hindi,"
    "fi finnish,vi vietnamese,he hebrew,uk ukrainian,el greek,ms malay,cs czech,ro romanian,da danish,"
    "hu hungarian,ta tamil,no norwegian,th thai,ur urdu,hr croatian,bg bulgarian,lt lithuanian,la latin,"
    "mi maori,ml malayalam,cy welsh,sk slovak,te telugu,fa persian,lv latvian,bn bengali,sr serbian,"
    "az azerbaijani,sl slovenian,kn kannada,et estonian,mk macedonian,br breton,eu basque,is icelandic,"
    "hy armenian,ne nepali,mn mongolian,bs bosnian,kk kazakh,sq albanian,sw swahili,gl galician,mr marathi,"
    "pa punjabi,si sinhala,km khmer,sn shona,yo yoruba,so somali,af afrikaans,oc occitan,ka georgian,"
    "be belarusian,tg tajik,sd sindhi,gu gujarati,am amharic,yi yiddish,lo lao,uz uzbek,fo faroese,"
    "ht haitian creole,ps pashto,tk turkmen,nn nynorsk,mt maltese,sa sanskrit,lb luxembourgish,my myanmar,"
    "bo tibetan,tl tagalog,mg malagasy,as assamese,tt tatar,haw hawaiian,ln lingala,ha hausa,ba bashkir,"
    "jw javanese,su sundanese,yue cantonese,my burmese,ca valencian,nl flemish,ht haitian,es castilian,zh mandarin"
)
LANGUAGE_CODES = {name: code for code, _, name in (item.partition(" ") for item in _LANGUAGES.split(","))}


def language_code(value: Any) -> str:
    """`english` or `en` → `en`; anything unknown is passed on as the server said it."""
    text = str(value or "").strip().lower()
    return LANGUAGE_CODES.get(text, text)


def retry_after(value: str | None, cap: float) -> float | None:
    """`Retry-After` (seconds or an HTTP date) as a nak delay, capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, MIN_RETRY_DELAY), cap)


def parse_verbose_json(data: Any) -> Transcript:
    """OpenAI's `verbose_json`: text, language, duration and segments (start, end, text)."""
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    segments = []
    for item in data.get("segments") or []:
        text = str(item.get("text") or "").strip()
        if text:
            segments.append(Segment(float(item["start"]), float(item["end"]), text))
    text = str(data.get("text") or "").strip()
    duration = float(data.get("duration") or (segments[-1].end if segments else 0.0))
    if text and not segments:  # a server that gives no segments: one that spans the audio
        segments.append(Segment(0.0, duration, text))
    return Transcript(text, language_code(data.get("language")), duration, tuple(segments))


class WhisperApi:
    def __init__(self, settings: TranscribeSettings, max_retry_delay: float) -> None:
        self.settings = settings
        self._max_delay = max_retry_delay
        self._session: aiohttp.ClientSession | None = None
        parts = urlsplit(settings.api_url)
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        self._secrets = [secret for secret in (key, parts.password, settings.api_url) if secret]
        # Where requests go, as logs and reasons may show it: never credentials or a query string.
        self.where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self.url = settings.api_url + "/audio/transcriptions"

    async def start(self) -> None:
        s = self.settings
        key = s.api_key.get_secret_value() if s.api_key is not None else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=s.api_timeout, sock_connect=CONNECT_TIMEOUT),
            trust_env=True,  # HTTPS_PROXY and friends, as operators expect
        )
        host = urlsplit(s.api_url).hostname or ""
        if key and s.api_url.startswith("http://") and host not in LOOPBACK:
            log.warning("TRANSCRIBE_API_KEY is sent over plain http", url=self.where)
        log.info("transcription API", url=self.where, model=s.api_model, concurrency=s.concurrency)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def transcribe(self, audio: Path, filename: str, content_type: str) -> Transcript:
        assert self._session is not None, "start() first"
        s = self.settings
        form = aiohttp.FormData()
        form.add_field("model", s.api_model)
        form.add_field("response_format", "verbose_json")
        form.add_field("timestamp_granularities[]", "segment")
        if s.language:
            form.add_field("language", s.language)
        upload = await asyncio.to_thread(audio.open, "rb")
        try:  # aiohttp streams the file in chunks, reading them off the event loop
            form.add_field("file", upload, filename=filename, content_type=content_type)
            async with self._session.post(
                self.url, data=form, headers=tracing.inject({}), allow_redirects=False
            ) as response:
                status, delay = response.status, response.headers.get("Retry-After")
                body = await self._read(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"transcribe: {self.where}: {type(exc).__name__}{self._detail(exc)}") from None
        finally:
            upload.close()
        if status in (408, 429) or status >= 500:
            raise RetryableError(
                f"transcribe: {self.where} answered {status}", delay=retry_after(delay, self._max_delay)
            )
        if not 200 <= status < 300:
            detail = "" if status in (401, 403) else self._detail(self._error_message(body))
            raise PermanentError(ErrorClass.PROCESSOR_FAILED, f"transcribe: {self.where} answered {status}{detail}")
        try:
            return parse_verbose_json(json.loads(body))
        except (ValueError, KeyError, TypeError) as exc:  # a proxy's error page with a 200, a broken server
            raise RetryableError(
                f"transcribe: {self.where} answered {status} with no usable verbose_json ({exc})"
            ) from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in response.content.iter_chunked(65536):
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise RetryableError(f"transcribe: {self.where} answered more than {MAX_RESPONSE_BYTES} bytes")
        return bytes(body)

    @staticmethod
    def _error_message(body: bytes) -> str:
        """OpenAI's `{"error": {"message": …}}`, FastAPI's `{"detail": …}`, or the start of the text."""
        try:
            data = json.loads(body)
        except ValueError:
            return body[:200].decode("utf-8", "replace")
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
            for key in ("error", "detail", "message"):
                if isinstance(data.get(key), str):
                    return str(data[key])
        return ""

    def _detail(self, what: object) -> str:
        text = str(what)
        for secret in self._secrets:  # the key, the URL's password, the URL itself (it may hold either)
            text = text.replace(secret, "***" if secret != self.settings.api_url else self.where)
        text = one_line(text, 200)
        return f": {text}" if text else ""
