"""Damaged, hand-edited or odd heads directories and tree files: one clear error naming the file, and a failed
load changes nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmedusa.files import parse_json
from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.export import HEADS_WEIGHTS_NAME, export_heads, read_heads

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can recurse


def _saved(make_llama, directory, **config):
    model = MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2, **config))
    with torch.no_grad():
        for seed, p in enumerate(model.medusa_heads.parameters()):  # heads start as copies: make them differ
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    model.save_heads(directory)
    return model


def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def _edit_weights(directory, edit):
    path = directory / HEADS_WEIGHTS_NAME
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_json_nested_too_deeply_is_broken_json_not_a_recursion_error(make_llama, tmp_path):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        parse_json(DEEP)
    _saved(make_llama, tmp_path)
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(nested too deeply"):
        read_heads(tmp_path)


def test_deep_tree_files_are_named(make_llama, tmp_path):
    from fastmedusa.decode.accuracy import read_tree_json
    from fastmedusa.decode.trees import resolve_tree

    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"deep.json is not JSON \(nested too deeply\)"):
        resolve_tree(str(tmp_path / "deep.json"), 2)
    (tmp_path / "tree.json").write_text(DEEP)
    with pytest.raises(ValueError, match="tree.json"):
        read_tree_json(tmp_path, 2)


@pytest.mark.parametrize("field", ["base_model_name_or_path", "base_model_gguf_file"])
@pytest.mark.parametrize("value", [5, [1]])
def test_a_base_model_that_is_not_a_string_names_the_config(make_llama, tmp_path, field, value):
    _saved(make_llama, tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"config.json: MedusaConfig {field}=.*pass a model id or path as a string"):
        read_heads(tmp_path)
    assert not (tmp_path.parent / "export").exists()
    with pytest.raises(ValueError, match=field):
        export_heads(tmp_path, tmp_path.parent / "export")
    assert not (tmp_path.parent / "export").exists()  # refused before anything is written


def test_a_failed_load_leaves_the_model_heads_as_they_were(make_llama, tmp_path):
    _saved(make_llama, tmp_path)
    _edit_weights(tmp_path, lambda state: state.pop("1.1.weight"))
    target = MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2))
    before = {k: v.clone() for k, v in target.medusa_heads.state_dict().items()}
    with pytest.raises(ValueError, match=r"do not fit: missing \['medusa_head.1.1.weight'\]"):
        target.load_heads(tmp_path)
    for key, value in target.medusa_heads.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_base_models_num_hidden_layers_beside_medusa_num_layers_is_not_a_conflict(tmp_path):
    """A Medusa-2 style config: the base model's fields (num_hidden_layers = its depth) plus the heads' own."""
    from fastmedusa.model import MedusaConfig

    config = MedusaConfig.from_dict({"num_hidden_layers": 32, "medusa_num_layers": 1, "medusa_num_heads": 4})
    assert (config.num_layers, config.num_heads) == (1, 4)


def test_shared_lm_head_over_per_head_projections_is_refused(make_llama, tmp_path):
    _saved(make_llama, tmp_path)
    _edit_config(tmp_path, shared_lm_head=True)  # vLLM's name for it, original_lm_head, still says false
    with pytest.raises(ValueError, match="original_lm_head=false and shared_lm_head=true name the same setting"):
        read_heads(tmp_path)
    _edit_config(tmp_path, original_lm_head=True)
    with pytest.raises(ValueError, match="says shared_lm_head=true .* a different vocabulary projection for each head"):
        read_heads(tmp_path)
    # shared heads as written (one projection stored per head, all equal) still load
    shared = _saved(make_llama, tmp_path / "shared", shared_lm_head=True)
    assert read_heads(tmp_path / "shared").config.shared_lm_head
    MedusaModel.from_base(shared.base, MedusaConfig(num_heads=2, shared_lm_head=True)).load_heads(tmp_path / "shared")


def test_damaged_draft_heads_are_named_as_damaged_not_as_another_model(make_llama, tmp_path):
    make = lambda: MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2, draft_vocab_size=40))  # noqa: E731
    make().save_heads(tmp_path)
    good = load_file(str(tmp_path / HEADS_WEIGHTS_NAME))

    def with_weights(edit):
        state = {k: v.clone() for k, v in good.items()}
        edit(state)
        save_file(state, str(tmp_path / HEADS_WEIGHTS_NAME))

    with_weights(lambda s: s.__setitem__("token_map", torch.cat([s["token_map"][:-1], torch.tensor([-1])])))
    with pytest.raises(ValueError, match=rf"{HEADS_WEIGHTS_NAME}: token_map holds id -1, outside the vocabulary"):
        read_heads(tmp_path)
    with_weights(lambda s: s.pop("token_map"))
    with pytest.raises(ValueError, match="says draft_vocab_size=40 but .* holds no token_map"):
        read_heads(tmp_path)
    with_weights(lambda s: s.__setitem__("0.1.weight", s["0.1.weight"][:30]))
    with pytest.raises(ValueError, match="says draft_vocab_size=40 but the heads' projections in .* have 30 rows"):
        read_heads(tmp_path)
    with_weights(lambda s: s.__setitem__("0.0.linear.weight", s["0.0.linear.weight"][None]))
    with pytest.raises(ValueError, match="where heads hold a 2-D tensor: the weights file is damaged"):
        make().load_heads(tmp_path)


def test_heads_for_another_model_name_the_heads_directory(make_llama, tmp_path):
    _saved(make_llama, tmp_path)
    other = MedusaModel.from_base(make_llama(vocab_size=300), MedusaConfig(num_heads=2))
    with pytest.raises(ValueError, match=f"heads in {tmp_path}: heads config .* trained for another base model"):
        other.load_heads(tmp_path)


def test_tree_files_with_a_num_heads_that_is_not_a_number(make_llama, tmp_path):
    from fastmedusa.decode.accuracy import read_tree_json
    from fastmedusa.decode.trees import load_tree

    (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0], [0, 0]], "num_heads": "2"}))
    with pytest.raises(ValueError, match="num_heads is '2', not a whole number of heads"):
        load_tree(tmp_path / "tree.json", 2)
    with pytest.raises(ValueError, match="num_heads is '2', not a whole number of heads"):
        read_tree_json(tmp_path, 2)


@pytest.mark.parametrize("name, match", [("", "is empty"), ("  ", "is empty"), ("/dev/null", "not a regular file")])
def test_tree_names_that_are_no_tree_file_say_what_they_are(name, match):
    from fastmedusa.decode.trees import resolve_tree

    with pytest.raises(ValueError, match=match):
        resolve_tree(name, 2)


def test_export_to_a_dangling_symlink_says_so(make_llama, tmp_path):
    _saved(make_llama, tmp_path / "heads")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match=r"--output .*link is a symbolic link to .*nowhere, which does not exist"):
        export_heads(tmp_path / "heads", link)
    with pytest.raises(FileExistsError, match="which does not exist"):
        _saved(make_llama, link)


def test_eval_keeps_a_users_file_at_the_default_output(tmp_path):
    from fastmedusa.heads_eval import check_eval_output

    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "eval.json").write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match=r"eval.json \(the default output\) exists and is not an earlier"):
        check_eval_output(heads / "eval.json", heads, None, given=False)
    earlier = {"heads": "h", "model": "m", "data": "d", "conversations": 1, "labels": 2}
    (heads / "eval.json").write_text(json.dumps(earlier))
    check_eval_output(heads / "eval.json", heads, None, given=False)  # an earlier result is eval's to replace


def test_chat_on_a_tokenizer_without_a_template_says_to_drop_it():
    from fastmedusa.decode.cli import encode_prompt

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="--chat: this model's tokenizer has no chat template.*drop --chat"):
        encode_prompt(NoTemplate(), "hi", chat=True)
