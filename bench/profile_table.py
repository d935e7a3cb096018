"""Summarise a py-spy profile (`--format raw`, collapsed stacks): where the samples go.

    python bench/profile_table.py PROFILE [--top 15]

With `py-spy record --threads`, samples are split by thread: the event loop (MainThread) and the
worker threads (`asyncio.to_thread`: fsync, file moves). For the event loop, three tables, each as a
share of its samples: functions by self time (the innermost frame), functions by cumulative time
(anywhere on the stack, counted once per sample), packages by cumulative time, and areas: each
sample goes to the area of its innermost frame that has one (S3 GET, NATS, save, decrypt, logging,
metrics, validation, our own code), else to the event loop itself. For the other threads, their top
functions by self time, as a share of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_TRIM = ("site-packages/", "/src/", "/lib/python3.", "/bench/")
# (area, what a frame's "function (file)" label contains): the first match, innermost frame first.
AREAS = (
    ("S3 GET: signing, HTTP (storage.py, aiohttp, botocore)", ("uploads_consumer/storage.py", "SignedGetter.")),
    ("S3 GET through aiobotocore", ("aiobotocore/",)),
    ("NATS client (nats-py)", ("(nats/",)),
    ("save processor, on the loop (thread hand-off)", ("uploads_consumer/processors/",)),
    ("decrypt, plaintext file", ("uploads_consumer/envelope.py", "PlaintextFile.")),
    ("logging (structlog)", ("(structlog/",)),
    ("metrics (prometheus_client)", ("(prometheus_client/",)),
    ("validation (pydantic)", ("(pydantic",)),
    ("our own code: consumer, pipeline, dedupe, events", ("(uploads_consumer/", "floor_consumer.py")),
)
LOOP_ITSELF = "the event loop itself (uvloop, asyncio, sockets)"


def _short_file(path: str) -> str:
    for marker in _TRIM:
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            elif marker == "/bench/":
                path = "bench/" + path
    return path


def _frame(text: str) -> tuple[str, str]:
    """(function label, package) of one frame, e.g. ('_resolve_endpoint_ruleset (botocore/client.py)', 'botocore')."""
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), text.strip()
    file = _short_file(match["file"])
    top = file.split("/", 1)[0]
    package = "stdlib/" + file.split("/")[1] if top == "stdlib" and "/" in file else top
    package = package.removesuffix(".py")
    return f"{match['func']} ({file})", package


class Samples:
    """The stacks of one group of threads. The entry frames, from the script down to the loop's
    `run` (the common start of the stacks), say nothing and are left out of the cumulative tables."""

    def __init__(self) -> None:
        self.total = 0
        self.stacks: list[tuple[list[tuple[str, str]], int]] = []

    def add(self, frames: list[tuple[str, str]], count: int) -> None:
        self.total += count
        self.stacks.append((frames, count))

    def areas(self) -> Counter[str]:
        entry = self._entry_frames()
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            labels = [label for label, _ in reversed(frames) if label not in entry]
            area = next((a for label in labels for a, marks in AREAS if any(m in label for m in marks)), LOOP_ITSELF)
            counts[area] += count
        return counts

    def counts(self) -> tuple[Counter[str], Counter[str], Counter[str]]:
        """(self, cumulative, package cumulative) sample counts."""
        own: Counter[str] = Counter()
        cumulative: Counter[str] = Counter()
        for frames, count in self.stacks:
            own[frames[-1][0]] += count
            for label in {label for label, _ in frames}:
                cumulative[label] += count
        everywhere = self._entry_frames()
        packages: Counter[str] = Counter()
        for frames, count in self.stacks:
            for package in {package for label, package in frames if label not in everywhere}:
                packages[package] += count
        for label in everywhere:
            cumulative.pop(label, None)
        return own, cumulative, packages

    def _entry_frames(self) -> set[str]:
        roots: Counter[str] = Counter()
        for frames, count in self.stacks:
            roots[frames[0][0]] += count
        if not roots:
            return set()
        root = roots.most_common(1)[0][0]
        prefix: list[str] | None = None
        for frames, _ in self.stacks:
            labels = [label for label, _ in frames]
            if labels[0] != root:
                continue  # py-spy cuts some deep stacks short; they do not decide the prefix
            if prefix is None:
                prefix = labels
            else:  # only a difference ends the prefix; a stack that stops inside it (loop's own C code) does not
                n = 0
                while n < min(len(prefix), len(labels)) and prefix[n] == labels[n]:
                    n += 1
                if n < min(len(prefix), len(labels)):
                    prefix = prefix[:n]
        return set(prefix or ())


def read_profile(path: Path) -> tuple[Samples, Samples, Counter[str]]:
    """(event loop thread, other threads, samples per thread name)."""
    loop, others = Samples(), Samples()
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread = "all threads (not split)"
        if parts[0].startswith("thread ("):  # py-spy --threads: "thread (TID): NAME"
            thread = parts.pop(0).partition(": ")[2] or "(unnamed)"
            if thread != thread.rstrip("0123456789"):  # uvloop_0, uvloop_1... (executor threads) → uvloop_*
                thread = thread.rstrip("0123456789") + "*"
        frames = [_frame(f) for f in parts if f and not f.startswith("process ")]
        if not frames:
            continue
        threads[thread] += count
        (loop if thread in ("MainThread", "all threads (not split)") else others).add(frames, count)
    return loop, others, threads


def _rows(counter: Counter[str], total: int, top: int) -> list[str]:
    return [f"| {name} | {100 * n / total:.1f}% |" for name, n in counter.most_common(top)]


def tables(path: Path, top: int = 15) -> str:
    loop, others, threads = read_profile(path)
    everything = loop.total + others.total
    if not everything:
        return f"{path}: no samples"
    out = [f"{path.name}: {everything} samples", "", "| thread | share of all samples |", "|---|---|"]
    out += _rows(threads, everything, top)
    if loop.total:
        own, cumulative, packages = loop.counts()
        for title, counter in (
            ("event loop, self", own),
            ("event loop, cumulative", cumulative),
            ("event loop, package (cumulative)", packages),
            ("event loop, by area", loop.areas()),
        ):
            out += ["", f"| {title} | share of the loop's samples |", "|---|---|"]
            out += _rows(counter, loop.total, top)
    if others.total:
        out += ["", "| other threads, self | share of all samples |", "|---|---|"]
        out += _rows(others.counts()[0], everything, min(top, 8))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(tables(args.profile, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
