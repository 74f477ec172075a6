"""`fastmedusa shrink-vocab` on a tiny training run: the map is the most frequent labels of the run's own
training split (counted here by hand; held-out conversations are not counted), the shrunk heads get their own
tree.json and decode, and bad input is one clear line with nothing written."""

import contextlib
import io
import json
import shutil
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


def _label_counts(conversations, tokenizer_dir, seq_len: int) -> Counter:
    """Label tokens of `conversations` as training encodes them, counted with a Counter."""
    from transformers import AutoTokenizer

    from fastmedusa.data import encode_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = Counter()
    for example in encode_dataset(tokenizer, conversations, seq_len, progress=False):
        counts.update(t for t in example["labels"] if t != -100)
    return counts


def _split_label_counts(run_dir, tokenizer_dir, **split) -> tuple[Counter, Counter, int]:
    """(training labels, held-out labels, training conversations) of the run's split (or of `split`'s)."""
    from fastmedusa.data import read_sharegpt, train_eval_split

    config = {**json.loads((run_dir / "train_config.json").read_text()), **split}
    conversations, _ = read_sharegpt(config["data"])
    train, held_out = train_eval_split(conversations, config["eval_size"], seed=config["seed"])
    seq_len = config["seq_len"]
    return _label_counts(train, tokenizer_dir, seq_len), _label_counts(held_out, tokenizer_dir, seq_len), len(train)


def _coverage(counts: Counter, kept: set) -> float:
    return sum(counts[t] for t in kept) / sum(counts.values())


def test_shrunk_heads_keep_the_most_frequent_training_labels(run_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["shrink-vocab", str(run_dir), "--draft-vocab", "12", "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "the 12 most frequent of 49152 tokens cover" in printed and "tree.json: " in printed
    saved = load_file(str(out / "medusa_lm_head.safetensors"))
    kept = set(saved["token_map"].tolist())
    counts, _, n_train = _split_label_counts(run_dir, tiny_model_dir)
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
    card = (out / "README.md").read_text()
    assert "the most frequent rows of full-vocabulary heads (`fastmedusa shrink-vocab`), covering" in card
    assert "Measured at the end of training" not in card  # that scored the full heads, not these
    assert "final_eval" not in config["training"]
    # the shrunk heads decode with their own tree.json
    assert main(["generate", "--model", str(tiny_model_dir), "--heads", str(out), "--prompt", "Count",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft-vocab", "49152"], "--draft-vocab 49152: pass fewer tokens than the heads' vocabulary of 49152"),
        (["--draft-vocab", "4"], "--draft-vocab 4: pass at least 10 tokens"),
        (["--draft-vocab", "0"], "--draft-vocab 0: pass at least 10 tokens"),
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


WORDS = "red orange yellow green blue indigo violet black white grey brown pink".split()


def test_only_the_training_split_is_counted(run_dir, tiny_model_dir, tmp_path, capsys):
    """The held-out answers repeat a word the training answers never use: were they counted, it would be the most
    frequent label of all."""
    from transformers import AutoTokenizer

    from fastmedusa.data import train_eval_split

    n, eval_size, seed = 30, 6, 5
    _, held = train_eval_split(list(range(n)), eval_size, seed=seed)
    records = []
    for i in range(n):
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i))
        answer += " zebra" * 40 if i in held else ""
        turns = [{"from": "human", "value": f"Name {i} colours."}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "conversations": turns})
    data = tmp_path / "colours.json"
    data.write_text(json.dumps(records))
    split = ["--data", str(data), "--eval-size", str(eval_size), "--seed", str(seed), "--max-conversations", "all"]
    out = tmp_path / "small"
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "12", "--output", str(out), "--tree-prompts", "0", *split]
    assert main(argv) == 0
    assert f"of the training labels ({n - eval_size} conversations)" in capsys.readouterr().out
    kept = set(load_file(str(out / "medusa_lm_head.safetensors"))["token_map"].tolist())
    zebra = AutoTokenizer.from_pretrained(tiny_model_dir)(" zebra", add_special_tokens=False)["input_ids"]
    assert not kept & set(zebra)
    counts, held_counts, _ = _split_label_counts(run_dir, tiny_model_dir, data=str(data), eval_size=eval_size, seed=seed)
    assert max(held_counts, key=held_counts.get) in zebra  # the held-out answers' most frequent label
    source = json.loads((out / "config.json").read_text())["draft_vocab_source"]
    assert source["train_label_coverage"] == pytest.approx(_coverage(counts, kept))
    assert source["held_out_label_coverage"] == pytest.approx(_coverage(held_counts, kept))
    assert source["held_out_label_coverage"] < 0.7  # zebra is a large share of the held-out labels


def test_heads_without_their_run_need_the_data_named(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "heads", bare)
    assert main(["shrink-vocab", str(bare), "--draft-vocab", "16", "--output", str(tmp_path / "o")]) == 2
    assert "has no train_config.json beside it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_without_chat_template_fails_before_anything_is_written(run_dir, tiny_model_dir, tmp_path, capsys):
    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "16", "--output", str(out), "--model", str(plain)]
    assert main(argv) == 2
    assert "tokenizer has no chat template: pass --tree-prompts 0" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_output_inside_the_heads_directory_is_refused(run_dir, capsys):
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "16", "--output", str(run_dir / "heads" / "small")]
    assert main(argv) == 2
    assert "is inside the heads directory" in capsys.readouterr().err
    assert not (run_dir / "heads" / "small").exists()


def test_a_count_that_is_no_number_is_a_usage_error(run_dir, tmp_path, capsys):
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "16", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--max-conversations", "many"])
    assert exit_info.value.code == 2
    assert "invalid count 'many': pass a number or 'all'" in capsys.readouterr().err


def test_an_earlier_output_is_replaced_but_nothing_else(run_dir, tmp_path, capsys):
    """The output is swapped in whole: an earlier shrink is replaced; a directory with other files (a hub clone's
    .git, notes), or a link, is refused before any work, and keeps every file."""
    argv = ["shrink-vocab", str(run_dir), "--tree-prompts", "0", "--device", "cpu"]
    out = tmp_path / "small"
    assert main([*argv, "--draft-vocab", "16", "--output", str(out)]) == 0
    assert main([*argv, "--draft-vocab", "12", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 12
    assert not list(tmp_path.glob(".small.*"))
    (out / "notes.md").write_text("mine")
    (out / ".git").mkdir()
    assert main([*argv, "--draft-vocab", "16", "--output", str(out)]) == 2
    assert "holds files that shrink-vocab does not write (.git, notes.md)" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine" and (out / ".git").is_dir()
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main([*argv, "--draft-vocab", "16", "--output", str(link)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert link.is_symlink()


def test_a_failed_measurement_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    """A tree.json measurement that fails after the heads were staged: no output, no staging, no new parents."""
    import fastmedusa.decode.accuracy as accuracy

    def fail(*args, **kwargs):
        raise ValueError("this model cannot be decoded")

    monkeypatch.setattr(accuracy, "measure_heads_tree", fail)
    out = tmp_path / "x" / "y" / "small"
    argv = ["shrink-vocab", str(run_dir), "--draft-vocab", "16", "--output", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert "measuring tree.json failed: this model cannot be decoded (--tree-prompts 0 skips it)" in (
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []
