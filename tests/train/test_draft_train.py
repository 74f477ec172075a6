"""`fastmedusa train --draft-vocab N`: the map is counted from the training labels, trained with, reported,
saved with the heads, and kept through a checkpoint."""

import json

import torch
from safetensors.torch import load_file

from fastmedusa.cli import main


def test_draft_vocab_run_counts_trains_and_saves_the_map(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    from fastmedusa.data.vocab import count_label_tokens
    from fastmedusa.model import MedusaModel

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "64", "--batch-size", "4", "--max-steps", "12", "--lr", "1e-2",
            "--eval-size", "8", "--eval-every", "0", "--save-every", "0", "--no-progress", "--device", "cpu",
            "--draft-vocab", "48", "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "draft vocabulary: the 48 most frequent of 49152 tokens cover" in printed
    assert "of held-out labels fall outside it" in printed
    evals = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ]
    assert 0.0 <= evals[-1]["outside_draft_frac"] < 1.0
    assert all(b > a for a, b in zip(evals[0]["top1"], evals[-1]["top1"])), (evals[0], evals[-1])
    saved = load_file(str(out / "heads" / "medusa_lm_head.safetensors"))
    token_map = saved["token_map"]
    assert token_map.shape == (48,) and torch.equal(token_map, token_map.sort().values)
    assert saved["0.1.weight"].shape == (48, 32)
    heads_config = json.loads((out / "heads" / "config.json").read_text())
    assert heads_config["draft_vocab_size"] == 48
    model = MedusaModel.from_pretrained(tiny_model_dir, heads=out / "heads")
    assert torch.equal(model.medusa_heads.token_map, token_map)
    capsys.readouterr()
    bench = ["bench", "heads", "--model", str(tiny_model_dir), "--heads", str(out / "heads"), "--ranks", "49",
             "--device", "cpu", "--out", str(tmp_path / "h.json")]  # fmt: skip
    assert main(bench) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --ranks 49: these draft-vocabulary heads choose among 48 tokens; pass at most 48"
    )
    # the map is the 48 most frequent label tokens of the training split: every id outside has a count
    # no higher than the least frequent id inside
    from fastmedusa.data import encode_dataset, read_sharegpt, train_eval_split
    from fastmedusa.model import load_tokenizer

    convs, _ = read_sharegpt(str(sharegpt_file), limit=300)
    train_convs, _ = train_eval_split(convs, 8, seed=0)
    counts = count_label_tokens(
        encode_dataset(load_tokenizer(str(tiny_model_dir)), train_convs, 64, False), 49152
    )
    inside = torch.zeros(49152, dtype=torch.bool)
    inside[token_map] = True
    assert counts[~inside].max() <= counts[inside].min()
    # the DCP checkpoint holds the map too (resume restores it)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(next(out.glob("checkpoint-*")), tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    assert torch.equal(ckpt["medusa_heads.token_map"], token_map)


def test_bad_draft_vocab_is_one_clear_line(capsys):
    assert main(["train", "--draft-vocab", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --draft-vocab 5: pass at least 10") and len(err.splitlines()) == 1


def test_draft_vocab_stage2_kl_run_saves_backbone_and_a_mapped_tree(tiny_model_dir, sharegpt_file, tmp_path):
    """The recipe's draft run: stage 2 with KL heads under a draft vocabulary writes the heads (with their map),
    the trained backbone beside them and a tree measured through the map; decoding loads them together."""
    from fastmedusa.model import MedusaModel

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(out),
            "--stage", "2", "--loss", "kl", "--num-heads", "2", "--seq-len", "64", "--batch-size", "4",
            "--max-steps", "3", "--lr", "1e-3", "--eval-size", "8", "--eval-every", "0", "--save-every", "0",
            "--tree-prompts", "2", "--no-progress", "--device", "cpu", "--draft-vocab", "48", "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    heads = out / "heads"
    tree = json.loads((heads / "tree.json").read_text())
    assert tree["paths"] and all(len(p) <= 2 for p in tree["paths"])
    assert (out / "model" / "config.json").exists()
    model = MedusaModel.from_pretrained(out / "model", heads=heads)
    assert model.medusa_heads.token_map.shape == (48,)
    ids = torch.tensor([[1, 5, 9, 13]])
    plain = model.generate(ids, max_new_tokens=6, medusa=False).sequences
    medusa = model.generate(ids, max_new_tokens=6, medusa=True).sequences
    assert torch.equal(plain, medusa)


def test_a_resumed_run_reports_the_coverage_of_the_checkpoints_map(
    tiny_model_dir, sharegpt_records, tmp_path, capsys
):
    """Resumed on changed data (--allow-changed-data) the heads keep the checkpoint's map: the coverage printed
    is that map's over the new labels, not that of a new count the heads never use."""
    from fastmedusa.data import encode_dataset, read_sharegpt, train_eval_split
    from fastmedusa.data.vocab import label_coverage, label_token_map
    from fastmedusa.model import load_tokenizer

    data, out = tmp_path / "sharegpt.json", tmp_path / "run"
    data.write_text(json.dumps(sharegpt_records(24)))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--num-heads",
            "1", "--seq-len", "64", "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0", "--no-progress",
            "--no-plot", "--device", "cpu", "--draft-vocab", "48"]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    shouted = sharegpt_records(24)  # other tokens: a new count would give another map
    for record in shouted:
        record["conversations"][1]["value"] = record["conversations"][1]["value"].upper()
    data.write_text(json.dumps(shouted))
    capsys.readouterr()
    assert main([*argv, "--max-steps", "3", "--resume", "--allow-changed-data"]) == 0
    printed = capsys.readouterr().out

    train_convs, _ = train_eval_split(read_sharegpt(str(data), limit=300)[0], 4, seed=0)
    labels = encode_dataset(load_tokenizer(str(tiny_model_dir)), train_convs, 64, False)
    kept = load_file(str(out / "heads" / "medusa_lm_head.safetensors"))["token_map"]
    kept_coverage, new_coverage = label_coverage(labels, 49152, kept), label_token_map(labels, 49152, 48)[1]
    assert new_coverage - kept_coverage > 0.5, (kept_coverage, new_coverage)
    assert f"its 48 of 49152 tokens cover {100 * kept_coverage:.2f}% of the training labels" in printed
    assert "most frequent" not in printed  # no line about a map the heads do not use
