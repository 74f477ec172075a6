"""The training benchmark's harness on the CPU (tiny Llama): rows, JSON and PNG, through the real Trainer."""

import json

from fastmedusa.bench import train as bench_train


def test_bench_train_harness_writes_rows_and_chart(tmp_path):
    out = tmp_path / "train_tiny.json"
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "tiny", "--seq-lens", "16", "--heads", "2",
            "--impls", "chunked", "--stages", "1", "2", "--batch-size", "2", "--steps", "1", "--profile",
            "--out", str(out), "--scratch", str(tmp_path / "scratch")]  # fmt: skip
    assert bench_train.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["stage"], r["heads"], r["seq_len"], r["impl"]) for r in rows] == [
        (1, 2, 16, "chunked"),
        (2, 2, 16, "chunked"),
    ]
    for row in rows:
        assert not row["oom"] and row["tokens_per_s"] > 0 and row["step_s"] > 0
        assert row["profile"]["heads_loss_s"] > 0 and row["profile"]["optimizer_s"] >= 0
    assert result["environment"]["versions"]["torch"]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_train_draft_vocab_rows_and_failed_peers(tmp_path):
    out = tmp_path / "train_tiny_draft.json"
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "tiny", "--seq-lens", "16", "--heads", "2",
            "--impls", "chunked", "quack", "--stages", "1", "--batch-size", "2", "--steps", "1",
            "--draft-vocab", "64", "--loss-chunk-rows", "8",
            "--out", str(out), "--scratch", str(tmp_path / "scratch")]  # fmt: skip
    assert bench_train.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["chunked"]["draft_vocab"] == 64 and rows["chunked"]["tokens_per_s"] > 0
    assert rows["quack"]["failed"] and "quack" in rows["quack"]["error"]  # CUDA only: a row saying why
    assert rows["chunked"]["loss_chunk_rows"] == 8 and rows["quack"]["loss_chunk_rows"] is None  # its own chunks
    assert "chunked, 8-row chunks" in bench_train.format_row(rows["chunked"])
    batch = bench_train.synthetic_batch(4, 500, 1000, "cpu", draft_vocab=64, draft_coverage=0.9)
    inside = (batch["labels"] < 64).float().mean().item()
    assert 0.85 < inside < 0.95
