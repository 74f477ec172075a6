"""The scripts that turn committed benchmark files into tables and charts, run on small crafted inputs."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(name: str, argv: list[str], capsys) -> str:
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    finally:
        sys.argv = old
    return capsys.readouterr().out


def _train_row(impl, seq_len, tok_s, gb, draft=None, oom=False):
    row = {"shape": "1b", "stage": 1, "heads": 5, "seq_len": seq_len, "impl": impl, "draft_vocab": draft}
    return row | ({"oom": True} if oom else {"tokens_per_s": tok_s, "peak_memory_gb": gb})


def test_draft_speedup_compares_the_draft_row_with_every_full_vocabulary_row(tmp_path, capsys):
    full = {"rows": [_train_row("torch", 1024, 30e3, 30.0), _train_row("liger", 1024, 20e3, 13.0),
                     _train_row("cce", 1024, 25e3, 12.0), _train_row("triton", 1024, 21e3, 14.0),
                     _train_row("torch", 4096, 0, 0, oom=True), _train_row("liger", 4096, 40e3, 15.0),
                     _train_row("cce", 4096, 30e3, 14.0), _train_row("triton", 4096, 41e3, 15.0)]}  # fmt: skip
    draft = {"environment": {"device": "test", "date": "2026-12-05"}, "settings": {"shape": "1b"},
             "rows": [_train_row("liger", 1024, 60e3, 6.0, 32768), _train_row("triton", 1024, 80e3, 5.0, 32768),
                      _train_row("triton", 4096, 100e3, 7.0, 32768)]}  # fmt: skip
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "draft.json").write_text(json.dumps(draft))
    out = tmp_path / "cmp.json"
    table = run_script("draft_speedup.py", ["--full", str(tmp_path / "full.json"), "--draft",
                                            str(tmp_path / "draft.json"), "--out", str(out)], capsys)  # fmt: skip
    points = json.loads(out.read_text())["points"]
    assert [p["seq_len"] for p in points] == [1024, 4096]
    assert points[0]["speedup_vs_liger_full"] == pytest.approx(4.0)
    assert points[1]["speedup_vs_liger_full"] == pytest.approx(2.5)
    assert points[1]["torch_full_tok_s"] is None and "OOM" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_recipe_report_builds_prefix_expectations_from_the_trees(tmp_path, capsys):
    acc = [[0.4, 0.1, 0.05], [0.2, 0.05, 0.02]]  # two heads, top-3 ranks
    (tmp_path / "tree_kl-distilled-2.json").write_text(json.dumps({"rank_accuracies": acc, "prompts": 2}))
    decode = {"args": {"heads": "h"}, "rows": [
        {"row": "greedy", "batch_size": 1, "tokens_per_s": 500.0, "tokens_per_step": 1.0, "step_ms": 2.0},
        {"row": "medusa", "batch_size": 1, "tokens_per_s": 600.0, "tokens_per_step": 1.5, "step_ms": 2.5,
         "speedup_vs_greedy": 1.2}]}  # fmt: skip
    (tmp_path / "decode_b1.json").write_text(json.dumps(decode))
    table = run_script("recipe_report.py", [str(tmp_path)], capsys)
    result = json.loads((tmp_path / "ablation.json").read_text())
    run = result["runs"][0]
    assert (run["loss"], run["data"], run["heads"]) == ("kl", "distilled", 2)
    assert run["top1_vs_own_greedy"] == [0.4, 0.2]
    one, two = (p["expected_tokens_per_step"] for p in run["prefixes"])
    # one head: the root always, plus head 1's top-3 candidates, one of which is right with p = 0.55
    assert one == pytest.approx(1 + 0.55, abs=1e-3)
    assert two > one
    assert [d["row"] for d in result["decode"]] == ["greedy", "medusa"]
    assert "KL on distilled (2 heads)" in table and (tmp_path / "ablation.png").stat().st_size > 0


def _decode_payload(rows):
    env = {"device": "test", "date": "2026-12-05", "versions": {}}
    return {"env": env, "model": "m", "prompt_set": "mt-bench", "dtype": "bfloat16", "rows": rows}


def _decode_row(row, batch, tok_s, per_step=1.0, nodes=0):
    return {"row": row, "batch_size": batch, "tokens_per_s": tok_s, "tokens_per_step": per_step,
            "step_ms": 1e3 * batch * per_step / tok_s, "tree_nodes": nodes}  # fmt: skip


def test_decode_by_batch_compares_only_rows_of_the_same_call(tmp_path, capsys):
    one = _decode_payload([_decode_row("greedy", 1, 500.0), _decode_row("medusa", 1, 1100.0, 3.6, 65),
                           {"row": "typical", "batch_size": 1, "error": "CompilationError"}])  # fmt: skip
    other = _decode_payload([_decode_row("greedy", 16, 8000.0), _decode_row("medusa", 16, 12000.0, 3.4, 17),
                             _decode_row("medusa", 64, 27000.0, 3.3, 17)])  # no greedy row at 64  # fmt: skip
    (tmp_path / "b1.json").write_text(json.dumps(one))
    (tmp_path / "b16.json").write_text(json.dumps(other))
    out = tmp_path / "by_batch.json"
    printed = run_script("decode_by_batch.py", ["--inputs", str(tmp_path / "b1.json"), str(tmp_path / "b16.json"),
                                                "--out", str(out)], capsys)  # fmt: skip
    rows = {(r["row"], r["batch_size"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("greedy", 1), ("medusa", 1), ("greedy", 16), ("medusa", 16), ("medusa", 64)}
    assert rows[("medusa", 1)]["speedup_vs_greedy"] == pytest.approx(2.2)
    assert rows[("medusa", 16)]["speedup_vs_greedy"] == pytest.approx(1.5)
    assert rows[("medusa", 64)]["speedup_vs_greedy"] is None  # never against another call's greedy row
    assert rows[("medusa", 16)]["source"] == "b16.json" and out.with_suffix(".png").is_file()
    assert "| 16 | medusa | 17 | 12,000 | 3.40 |" in printed and "1.50x" in printed
