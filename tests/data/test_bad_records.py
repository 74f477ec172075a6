"""One bad record costs one record: bad bytes, lone surrogates, deep nesting, a mid-file syntax error,
a huge turn, duplicates. Each file is built the way such data arrives."""

import json
import time

import pytest

from fastmedusa.data import chat as chat_module
from fastmedusa.data import encode_dataset, read_sharegpt, train_eval_split
from fastmedusa.data import sharegpt as sharegpt_module


def _record(i: int, answer: str | None = None) -> dict:
    turns = [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": answer or f"answer {i}"}]
    return {"id": str(i), "conversations": turns}


def _answers(conversations) -> list[str]:
    return [c[-1]["content"] for c in conversations]


def test_a_lone_surrogate_is_replaced_and_the_batch_encodes(tmp_path, smollm2_tokenizer):
    text = json.dumps([_record(0), _record(1)]).replace("answer 1", "answer \\ud800 1")
    path = tmp_path / "d.json"
    path.write_text(text)  # the JSON escape itself: valid JSON, invalid Unicode once decoded
    conversations, n_skipped = read_sharegpt(path)
    assert n_skipped == 0 and _answers(conversations) == ["answer 0", "answer \ufffd 1"]
    assert conversations.stats.n_replaced_surrogates == 1
    assert "1 lone surrogates replaced" in conversations.stats.summary()
    encoded = encode_dataset(smollm2_tokenizer, conversations, 64, progress=False)
    assert len(encoded) == 2  # the tokenizer took the whole batch (a surrogate raised TypeError before)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deep_nesting_costs_one_record(tmp_path, suffix):
    deep = '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    good = [json.dumps(_record(i)) for i in range(3)]
    rows = [good[0], deep, good[1], good[2]]
    path = tmp_path / f"d{suffix}"
    path.write_text("[" + ",\n".join(rows) + "]" if suffix == ".json" else "\n".join(rows) + "\n")
    conversations, n_skipped = read_sharegpt(path)
    assert _answers(conversations) == ["answer 0", "answer 1", "answer 2"]
    assert n_skipped == 1 and conversations.stats.skip_reasons == {"nested too deeply": 1}
    assert not conversations.stats.truncated


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_a_syntax_error_in_record_2_costs_only_that_record(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sharegpt_module, "CHUNK_CHARS", chunk)
    records = [json.dumps(_record(i), indent=2) for i in range(50)]
    records[1] = records[1].replace('"from": "gpt",', '"from": "gpt" "oops",')  # a missing comma
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(records) + "\n]\n")
    conversations, n_skipped = read_sharegpt(path)
    assert _answers(conversations) == [f"answer {i}" for i in range(50) if i != 1]
    stats = conversations.stats
    assert n_skipped == 1 and stats.skip_reasons == {"invalid JSON record": 1}
    assert not stats.truncated and stats.n_records == 50


def test_truncation_is_reported_only_at_the_end(tmp_path):
    records = [json.dumps(_record(i)) for i in range(6)]
    records[2] = records[2].replace('"id"', '"id" "bad"')
    text = "[" + ", ".join(records) + "]"
    path = tmp_path / "d.json"
    path.write_text(text[: text.index("answer 5")])  # also cut inside the last record
    conversations, _ = read_sharegpt(path)
    stats = conversations.stats
    assert _answers(conversations) == ["answer 0", "answer 1", "answer 3", "answer 4"]
    assert stats.truncated and stats.skip_reasons == {"invalid JSON record": 1}


def test_a_byte_that_is_not_utf8_costs_nothing_and_is_counted(tmp_path):
    raw = json.dumps([_record(0), _record(1), _record(2)]).encode()
    raw = raw.replace(b"answer 1", b"answer \xff 1")
    path = tmp_path / "d.json"
    path.write_bytes(raw)
    conversations, n_skipped = read_sharegpt(path)
    assert n_skipped == 0 and _answers(conversations) == ["answer 0", "answer \ufffd 1", "answer 2"]
    assert conversations.stats.n_replaced_bytes == 1
    assert f"{path}: 3 conversations kept" in conversations.stats.summary()
    assert "1 bytes that are not UTF-8" in conversations.stats.summary()


def test_exact_duplicates_are_dropped_so_they_cannot_straddle_the_split(tmp_path):
    records = [_record(i) for i in range(20)]
    records += [{**_record(i), "id": f"copy-{i}"} for i in range(10)]  # same turns, another id
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    conversations, n_skipped = read_sharegpt(path)
    assert len(conversations) == 20 and n_skipped == 10
    assert conversations.stats.skip_reasons == {"duplicate conversation": 10}
    train, held_out = train_eval_split(conversations, 5, seed=0)
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in held_out}


def test_a_huge_turn_is_cut_before_tokenizing(smollm2_tokenizer, monkeypatch):
    huge = "lorem ipsum dolor sit amet " * 400_000  # 10.8 MB of text
    conversation = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": huge}]
    seen: list[int] = []
    real = chat_module._call_tokenizer

    def spy(tokenizer, texts, max_length):
        seen.extend(len(t) for t in texts)
        return real(tokenizer, texts, max_length)

    monkeypatch.setattr(chat_module, "_call_tokenizer", spy)
    started = time.perf_counter()
    [row] = encode_dataset(smollm2_tokenizer, [conversation], 128, progress=False)
    assert time.perf_counter() - started < 3
    assert max(seen) <= 128 * chat_module.CUT_CHARS_PER_TOKEN + chat_module.CUT_MARGIN
    # the same ids as tokenizing a whole (shorter) text: the cut changes nothing inside the kept tokens
    text, _ = chat_module.render_with_spans(smollm2_tokenizer, conversation)
    whole = smollm2_tokenizer(text[:200_000], add_special_tokens=False, truncation=True, max_length=128)
    assert row["input_ids"] == whole["input_ids"] and len(row["input_ids"]) == 128


def test_long_tokens_fall_back_to_the_whole_text(smollm2_tokenizer):
    """Text whose tokens are longer than the cut assumes (runs of spaces) still gives the whole text's ids."""
    spaces = (" " * 80 + "x") * 2000
    conversation = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": spaces}]
    [row] = encode_dataset(smollm2_tokenizer, [conversation], 2048, progress=False)
    text, _ = chat_module.render_with_spans(smollm2_tokenizer, conversation)
    whole = smollm2_tokenizer(text, add_special_tokens=False, truncation=True, max_length=2048)
    assert row["input_ids"] == whole["input_ids"]
