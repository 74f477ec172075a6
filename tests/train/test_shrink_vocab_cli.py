"""`fastmedusa shrink-vocab` on a tiny training run: the map is the most frequent labels of the run's own
training split (counted here by hand), the shrunk heads get their own tree.json and decode, and bad input is
one clear line."""

import contextlib
import io
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from fastmedusa.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, sharegpt_records):
    root = tmp_path_factory.mktemp("shrink-run")
    data = root / "sharegpt.json"
    data.write_text(json.dumps(sharegpt_records(40, seed=3)))
    out = root / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "64", "--batch-size", "4", "--max-steps", "6", "--lr", "1e-2",
            "--eval-size", "8", "--eval-every", "0", "--save-every", "0", "--tree-prompts", "2", "--no-progress",
            "--no-plot", "--device", "cpu"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out


def _training_label_counts(run_dir, tokenizer_dir) -> tuple[Counter, int]:
    """Label tokens of the run's training conversations as training encodes them, counted with a Counter."""
    from transformers import AutoTokenizer

    from fastmedusa.data import encode_dataset, read_sharegpt, train_eval_split

    config = json.loads((run_dir / "train_config.json").read_text())
    conversations, _ = read_sharegpt(config["data"])
    train, _ = train_eval_split(conversations, config["eval_size"], seed=config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = Counter()
    for example in encode_dataset(tokenizer, train, config["seq_len"], progress=False):
        counts.update(t for t in example["labels"] if t != -100)
    return counts, len(train)


def test_shrunk_heads_keep_the_most_frequent_training_labels(run_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["shrink-vocab", str(run_dir), "--draft-vocab", "12", "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "the 12 most frequent of 49152 tokens cover" in printed and "tree.json: " in printed
    saved = load_file(str(out / "medusa_lm_head.safetensors"))
    kept = set(saved["token_map"].tolist())
    counts, n_train = _training_label_counts(run_dir, tiny_model_dir)
    # every kept id is at least as frequent among the training labels as any token left out
    left_out = max((n for token, n in counts.items() if token not in kept), default=0)
    assert len(kept) == 12 and min(counts[t] for t in kept) >= left_out > 0
    full = load_file(str(run_dir / "heads" / "medusa_lm_head.safetensors"))
    for head in range(2):
        assert torch.equal(saved[f"{head}.1.weight"], full[f"{head}.1.weight"][saved["token_map"]])
        assert torch.equal(saved[f"{head}.0.linear.weight"], full[f"{head}.0.linear.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == 12 and config["truncated_vocab_size"] == 12
    assert config["draft_vocab_source"]["heads"] == str(run_dir / "heads")
    assert config["draft_vocab_source"]["train_conversations"] == n_train
    tree = json.loads((out / "tree.json").read_text())
    assert tree["prompts"] >= 1 and tree["expected_tokens_per_step"] >= 1.0
    assert "the most frequent rows of full-vocabulary heads (`fastmedusa shrink-vocab`), covering" in (
        out / "README.md"
    ).read_text()
    # the shrunk heads decode (their own tree.json), and the result is lossless
    assert main(["generate", "--model", str(tiny_model_dir), "--heads", str(out), "--prompt", "Count",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft-vocab", "49152"], "--draft-vocab 49152: pass fewer tokens than the heads' vocabulary of 49152"),
        (["--draft-vocab", "4"], "draft_vocab_size=4: pass an integer >= 10"),
        (["--draft-vocab", "16", "--tree-prompts", "-1"], "--tree-prompts -1: pass 0"),
        (["--draft-vocab", "16", "--eval-size", "-2"], "--eval-size -2"),
    ],
)
def test_bad_input_is_one_clear_line(run_dir, tmp_path, extra, message, capsys):
    assert main(["shrink-vocab", str(run_dir), "--output", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_shrunk_heads_cannot_be_shrunk_again_nor_written_over_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "small"
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "16", "--tree-prompts", "0", "--device", "cpu"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "no tree.json measured (--tree-prompts 0)" in capsys.readouterr().out
    assert not (out / "tree.json").exists()
    assert main(["shrink-vocab", str(out), "--draft-vocab", "12", "--output", str(tmp_path / "again")]) == 2
    assert "already project onto a draft vocabulary of 16 tokens" in capsys.readouterr().err
    assert main([*argv, "--output", str(run_dir / "heads")]) == 2
    assert "is the heads directory itself" in capsys.readouterr().err
