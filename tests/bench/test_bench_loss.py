"""`fastmedusa bench loss` on the CPU with tiny shapes: the harness, rows, JSON and PNG (the numbers that
count come from a GPU)."""

import json

import pytest

from fastmedusa.bench import loss as bench_loss
from fastmedusa.cli import main


def _argv(out, *extra):
    return ["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--hidden", "16", "--vocab", "97",
            "--seq-lens", "9", "--heads", "1", "3", "--warmup", "0", "--repeats", "1", "--chunk-rows", "5",
            "--out", str(out), *extra]  # fmt: skip


def test_kl_bench_rows_agree_and_peers_are_rows(tmp_path):
    out = tmp_path / "loss_kl.json"
    argv = _argv(out, "--loss", "kl", "--impls", "torch", "chunked", "triton", "liger")
    assert main(["bench", "loss", *argv]) == 0
    result = json.loads(out.read_text())
    assert result["loss"] == "kl" and result["env"]["versions"]["torch"]
    rows = result["rows"]
    assert [(r["heads"], r["impl"]) for r in rows] == [
        (k, i) for k in (1, 3) for i in ("torch", "chunked", "triton", "liger")
    ]
    for k in (1, 3):
        ok = {r["impl"]: r for r in rows if r["heads"] == k and r["status"] == "ok"}
        assert set(ok) == {"torch", "chunked", "triton"}  # Liger: CUDA only, a row saying why
        assert ok["chunked"]["loss_sum"] == pytest.approx(ok["torch"]["loss_sum"], rel=1e-5)
        assert ok["triton"]["loss_sum"] == pytest.approx(ok["torch"]["loss_sum"], rel=1e-5)
        assert ok["triton"]["flops"] == (2 + 6 * k) * 2 * 9 * 16 * 97 and ok["triton"]["ms"] > 0
    assert all(r["status"] == "missing" and r["note"] for r in rows if r["impl"] == "liger")
    assert result["summary"] == [] or all("triton" in line for line in result["summary"])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_ce_bench_still_runs_on_the_cpu(tmp_path):
    out = tmp_path / "loss.json"
    assert bench_loss.main(_argv(out, "--impls", "torch", "chunked")) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"torch", "chunked"} and all(r["status"] == "ok" for r in rows)
    assert rows[0]["flops"] == 6 * 1 * 2 * 9 * 16 * 97


def test_an_impl_of_the_other_loss_is_one_clear_line(tmp_path, capsys):
    assert main(["bench", "loss", *_argv(tmp_path / "x.json", "--loss", "kl", "--impls", "cce")]) == 2
    assert "error: --impls cce: not an impl of --loss kl" in capsys.readouterr().err


def test_draft_vocab_rows_project_onto_the_draft_rows(tmp_path):
    out = tmp_path / "loss_draft.json"
    argv = _argv(out, "--impls", "torch", "triton", "quack", "--vocab", "300", "--draft-vocab", "97")
    assert bench_loss.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"torch", "triton"} and all(r["draft_vocab"] == 97 for r in rows)
    assert ok[0]["flops"] == 6 * 1 * 2 * 9 * 16 * 97  # the heads' GEMMs over the 97 draft rows
    for k in (1, 3):
        by = {r["impl"]: r for r in ok if r["heads"] == k}
        assert by["triton"]["loss_sum"] == pytest.approx(by["torch"]["loss_sum"], rel=1e-5)
    assert all(r["status"] == "missing" and "quack" in r["note"] for r in rows if r["impl"] == "quack")


def test_draft_labels_for_bench_cover_the_asked_fraction():
    import torch

    labels = torch.zeros(4, 5000, dtype=torch.long)
    labels[:, :100] = -100
    mapped = bench_loss.draft_labels_for_bench(labels, 1000, 100, 0.9, seed=0)
    scored = labels != -100
    assert (mapped[~scored] == -100).all()
    inside = (mapped[scored] != -100).float().mean().item()
    assert abs(inside - 0.9) < 0.01 and int(mapped.max()) < 100


def test_a_peer_whose_api_changed_is_an_error_row(tmp_path, monkeypatch):
    from fastmedusa.ops import peers

    def old_api(*args, **kwargs):
        raise TypeError("forward() takes 5 positional arguments but 6 were given")

    monkeypatch.setattr(peers, "peer_kl_divergence", old_api)
    out = tmp_path / "loss_kl.json"
    assert (
        bench_loss.main(_argv(out, "--loss", "kl", "--heads", "2", "--impls", "chunked", "liger-chunked"))
        == 0
    )
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["chunked"]["status"] == "ok"
    assert rows["liger-chunked"]["status"] == "error" and "TypeError" in rows["liger-chunked"]["note"]


def test_a_peer_that_fails_at_run_time_is_an_error_row_not_a_missing_one(tmp_path, monkeypatch):
    """quack-kernels raised a ValueError of its own on the H100 ('m == n makes row/col inference ambiguous'):
    that is the peer failing, not the peer being absent."""
    real = bench_loss.loss_fn

    def failing(impl, chunk_rows):
        if impl == "quack":
            return lambda *args: (_ for _ in ()).throw(ValueError("m == n makes row/col inference ambiguous"))
        return real(impl, chunk_rows)

    monkeypatch.setattr(bench_loss, "loss_fn", failing)
    out = tmp_path / "loss.json"
    assert bench_loss.main(_argv(out, "--impls", "torch", "quack", "liger")) == 0
    rows = json.loads(out.read_text())["rows"]
    quack = [r for r in rows if r["impl"] == "quack"]
    assert quack and all(r["status"] == "error" and "ambiguous" in r["note"] for r in quack)
    assert all(r["status"] == "missing" for r in rows if r["impl"] == "liger")  # CUDA only: absent here
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "torch")
