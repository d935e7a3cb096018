"""Recognition in speech windows: what the `faster-whisper` backend does when TRANSCRIBE_VAD is on.

Silero VAD (faster-whisper's) finds the speech; the speech regions, without the silence between
them, are grouped into windows of at most TRANSCRIBE_WINDOW_SECONDS of speech (20), and each
window is recognised on its own (no text carried from one to the next, no timestamp tokens: one
segment per window, timed by the speech it holds). This is the scheme of faster-whisper's BatchedInferencePipeline, one window at
a time.

One more step is ours: Whisper's encoder is given the window's own length (plus WINDOW_MARGIN,
at least MIN_WINDOW) instead of 30 seconds padded with silence, and its cost falls with it — the
encoder is half of the work on a voice memo. Whisper was trained on 30-second windows only; given
much less, a model may not find the end and repeat itself. The answer is checked: a trimmed
window whose text repeats itself (gzip ratio above 2.4, faster-whisper's threshold) or that fills
the decoder's whole length is recognised again at 30 seconds. TRANSCRIBE_TRIM_WINDOWS=false
always pads to 30 seconds.
"""

from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from uploads_consumer.processors.transcode import SAMPLE_RATE

WINDOW_SECONDS = 30.0  # what Whisper was trained on, and the most its encoder takes
MIN_WINDOW_SECONDS = 10.0
WINDOW_MARGIN_SECONDS = 3.0  # of silence after the speech, so that the model hears it end
FRAMES_PER_SECOND = 100  # the feature extractor's: a hop of 10 ms
MAX_COMPRESSION_RATIO = 2.4
NO_REPEAT_NGRAM = 3  # the last resort against a loop: no three tokens twice
SPEECH_LEVEL_DBFS = -20.0
MAX_GAIN_DB = 40.0  # a window of near silence the VAD let through is not raised into noise


class Stopped(Exception):
    """The transcription was cancelled; its thread gives up at the next window."""


@dataclass(frozen=True)
class Window:
    start: int  # sample where its first speech region starts, in the audio it came from
    end: int  # sample where its last speech region ends
    regions: tuple[tuple[int, int], ...]  # the speech it holds, (start, end) samples

    @property
    def speech_samples(self) -> int:
        return sum(end - start for start, end in self.regions)


@dataclass(frozen=True)
class Recognised:
    start: float  # seconds from the start of the audio given
    end: float
    text: str


def group_windows(regions: list[dict[str, int]], most: float = WINDOW_SECONDS) -> list[Window]:
    """Speech regions ({"start", "end"} samples, in order) → windows holding at most `most` seconds of
    speech each. A region longer than that (the VAD caps them at it) is a window of its own."""
    limit = int(most * SAMPLE_RATE)
    windows: list[Window] = []
    current: list[tuple[int, int]] = []
    for region in regions:
        span = (region["start"], region["end"])
        if current and (sum(e - s for s, e in current) + span[1] - span[0] > limit):
            windows.append(Window(current[0][0], current[-1][1], tuple(current)))
            current = []
        current.append(span)
    if current:
        windows.append(Window(current[0][0], current[-1][1], tuple(current)))
    return windows


def window_speech(audio: Any, window: Window) -> Any:
    """The speech of a window, its regions one after the other, the silence between them left out."""
    import numpy as np

    return np.concatenate([audio[start:end] for start, end in window.regions])


def level(speech: Any) -> Any:
    """Speech brought to SPEECH_LEVEL_DBFS (RMS), raised by MAX_GAIN_DB at most. Whisper's features
    are not blind to level: 48 memos recorded 30 dB too quiet lost 0.168 of their words against
    0.139 at their level (tiny.en, about 1000 s); levelled here, 0.124 and 0.128. transcode's
    loudness normalisation did as well, for as much CPU as half of the recognition.
    """
    import numpy as np

    rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64)))) if len(speech) else 0.0
    if rms <= 0.0:
        return speech
    gain = min(10 ** (SPEECH_LEVEL_DBFS / 20) / rms, 10 ** (MAX_GAIN_DB / 20))
    return np.multiply(speech, gain, dtype=np.float32)


def encoder_frames(frames: int, trim: bool) -> int:
    """How many feature frames the encoder is given for a window of `frames`: 30 seconds' worth,
    or (trimmed) the window's own length plus the margin, at least the minimum, in whole seconds."""
    full = int(WINDOW_SECONDS * FRAMES_PER_SECOND)
    if not trim:
        return full
    wanted = math.ceil(frames / FRAMES_PER_SECOND + WINDOW_MARGIN_SECONDS) * FRAMES_PER_SECOND
    return min(full, max(int(MIN_WINDOW_SECONDS * FRAMES_PER_SECOND), wanted))


def repeats_itself(text: str) -> bool:
    data = text.encode("utf-8")
    return bool(data) and len(data) / len(zlib.compress(data)) > MAX_COMPRESSION_RATIO


class WindowRecogniser:
    """Recognises float32 16 kHz audio window by window with a loaded faster-whisper WhisperModel."""

    def __init__(
        self, model: Any, beam_size: int, trim: bool, min_silence_ms: int, most: float = WINDOW_SECONDS
    ) -> None:
        from faster_whisper.vad import VadOptions

        self.model = model
        self.beam_size = beam_size
        self.trim = trim
        self.most = most  # seconds of speech a window holds at most
        self.vad = VadOptions(min_silence_duration_ms=min_silence_ms, max_speech_duration_s=most)
        self._tokenizers: dict[str, Any] = {}

    def recognise(self, audio: Any, language: str | None, stop: threading.Event) -> tuple[list[Recognised], str]:
        """(what was said, window by window; the language: `language`, else detected in the first window)."""
        from faster_whisper.vad import get_speech_timestamps

        found: list[Recognised] = []
        if language is None and not self.model.model.is_multilingual:
            language = "en"
        for window in group_windows(get_speech_timestamps(audio, self.vad), self.most):
            if stop.is_set():
                raise Stopped()
            features = self._features(audio, window)
            encoded, trimmed = self._encode(features, trim=self.trim and language is not None)
            if language is None:  # detected on a full window, as Whisper was trained
                language = self._detect_language(encoded)
            text, filled = self._decode(encoded, language)
            if filled or repeats_itself(text):  # a loop: the model did not find the end of the speech
                if trimmed:
                    encoded, _ = self._encode(features, trim=False)
                    text, filled = self._decode(encoded, language)
                if filled or repeats_itself(text):
                    text, _ = self._decode(encoded, language, no_repeat_ngram_size=NO_REPEAT_NGRAM)
            if text:
                found.append(Recognised(window.start / SAMPLE_RATE, window.end / SAMPLE_RATE, text))
        return found, language or ""

    def _features(self, audio: Any, window: Window) -> Any:
        return self.model.feature_extractor(level(window_speech(audio, window)))[..., :-1]  # the last: padding's

    def _encode(self, features: Any, trim: bool) -> tuple[Any, bool]:
        """(the encoder's output for the window, whether it was given less than 30 seconds)."""
        import numpy as np

        frames = encoder_frames(features.shape[-1], trim)
        window = np.zeros((features.shape[0], frames), dtype=np.float32)
        window[:, : min(frames, features.shape[-1])] = features[:, :frames]
        return self.model.encode(window), frames < WINDOW_SECONDS * FRAMES_PER_SECOND

    def _detect_language(self, encoded: Any) -> str:
        token, _ = self.model.model.detect_language(encoded)[0][0]
        return str(token)[2:-2]  # "<|de|>" → "de"

    def _tokenizer(self, language: str) -> Any:
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            multilingual = self.model.model.is_multilingual
            self._tokenizers[language] = Tokenizer(self.model.hf_tokenizer, multilingual, "transcribe", language)
        return self._tokenizers[language]

    def _decode(self, encoded: Any, language: str, no_repeat_ngram_size: int = 0) -> tuple[str, bool]:
        """(the text, whether it filled the decoder's whole length)."""
        from faster_whisper.transcribe import get_suppressed_tokens

        tokenizer = self._tokenizer(language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        [result] = self.model.model.generate(
            encoded,
            [prompt],
            beam_size=self.beam_size,
            max_length=self.model.max_length,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        tokens = result.sequences_ids[0]
        filled = len(prompt) + len(tokens) >= self.model.max_length
        return str(tokenizer.decode(tokens)).strip(), filled
