"""Conversations to token ids and labels with the tokenizer's own chat template.

Labels cover what the model must generate in an assistant turn: the content and the template's
end-of-turn token (e.g. `<|im_end|>`), so heads also learn where turns stop. Everything else (system
and user turns, role headers such as `<|im_start|>assistant\\n`, the newline after the end token) is
-100. Labels are aligned with `input_ids` (not shifted); the loss does the shifting.

How the assistant spans are found, for any template: render the whole conversation once, and for
each assistant turn render the prefix up to its generation prompt; the turn's content is searched for
from there, and the label span runs on to the first special token after the content. Characters map to
tokens through the fast tokenizer's offsets, so the ids are exactly those of tokenizing the whole text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fastmedusa.data.sharegpt import Conversation
from fastmedusa.progress import Progress

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TOKENIZE_BATCH = 256  # texts per call of the Rust tokenizer: amortises the Python overhead
# Text kept per token before tokenizing (English BPE averages ~4 characters a token) and a margin longer
# than any token (SmolLM2's longest is 81 characters).
CUT_CHARS_PER_TOKEN = 16
CUT_MARGIN = 256

Span = tuple[int, int]  # [start, stop) character offsets of labelled text


def render_with_spans(tokenizer, conversation: Conversation) -> tuple[str, list[Span]]:
    """The conversation as text, and the character spans of the assistant tokens to learn."""
    _check_conversation(conversation)
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, conversation)
    return _render_plain(tokenizer, conversation)


def _check_conversation(conversation: Conversation) -> None:
    if not isinstance(conversation, list) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
        for t in conversation
    ):
        raise ValueError(
            'a conversation must be a list of {"role": str, "content": str} dicts; '
            "normalise raw records with fastmedusa.data.read_sharegpt or normalize_record"
        )


def _apply(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def generation_prompt(tokenizer, messages: Conversation) -> str:
    """The text a chat model continues to answer `messages`: its chat template with the generation prompt."""
    _check_conversation(messages)
    return _apply(tokenizer, messages, add_generation_prompt=True)


def _render_template(tokenizer, conversation: Conversation) -> tuple[str, list[Span]]:
    full = _apply(tokenizer, conversation)
    markers = _end_markers(tokenizer)
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start = _generation_start(tokenizer, conversation, i, full)
        content = message["content"].strip()  # templates may trim; the stripped text is always inside
        at = full.find(content, max(start, cursor))
        if at < 0:
            raise ValueError(
                f"the chat template does not render assistant turn {i} verbatim, so its tokens cannot be "
                "located; use a template that keeps message content unchanged"
            )
        end = _end_of_turn(full, at + len(content), markers)
        spans.append((at, end))
        cursor = end
    return full, spans


def _generation_start(tokenizer, conversation: Conversation, i: int, full: str) -> int:
    """Where the model starts generating turn i: the end of the prefix rendered with a generation prompt.

    Templates that render a prefix differently from the whole (or reject it) give 0: the content search
    then starts after the previous assistant turn.
    """
    try:
        prompt = _apply(tokenizer, conversation[:i], add_generation_prompt=True)
    except Exception:  # e.g. a template that raises on an empty or user-less prefix
        return 0
    return len(prompt) if full.startswith(prompt) else 0


def _end_markers(tokenizer) -> list[str]:
    """Special-token strings that can close a turn (eos, `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`...)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            special.add(getattr(token, "content", str(token)))
    if tokenizer.eos_token:
        special.add(tokenizer.eos_token)
    return sorted((s for s in special if s), key=len, reverse=True)


def _end_of_turn(text: str, content_end: int, markers: list[str]) -> int:
    """End of the special token that follows the content (past blanks), or the content's end if none."""
    at = content_end
    while at < len(text) and text[at].isspace():
        at += 1
    for marker in markers:  # longest first, so `<|im_end|>` wins over a shorter prefix of it
        if text.startswith(marker, at):
            return at + len(marker)
    return content_end


def _render_plain(tokenizer, conversation: Conversation) -> tuple[str, list[Span]]:
    """Fallback for tokenizers without a chat template: `Role: content` lines, eos after each answer.

    `User: hi\\nAssistant: hello<eos>\\n`: labels on `hello<eos>`.
    """
    parts: list[str] = []
    spans: list[Span] = []
    length = 0
    eos = tokenizer.eos_token or ""
    for message in conversation:
        header = f"{message['role'].capitalize()}: "
        body = message["content"] + (eos if message["role"] == "assistant" else "")
        if message["role"] == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        parts.append(header + body + "\n")
        length += len(parts[-1])
    return "".join(parts), spans


def labels_from_offsets(ids: Sequence[int], offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """Copy ids whose characters overlap a labelled span; -100 elsewhere. Spans are sorted, disjoint."""
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (start, stop) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        if stop > spans[k][0] and start < spans[k][1] and stop > start:
            labels[t] = ids[t]
    return labels


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r}: pass an int >= 2 (a token and the one it predicts)")


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], list[Span]]]:
    """Ids and character offsets of the first `max_length` tokens of each text.

    A text is cut to `max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN` characters before the tokenizer sees
    it: a turn of megabytes would otherwise be tokenized whole (seconds, gigabytes) only to keep
    `max_length` tokens. Where the cut could matter (fewer than `max_length` tokens came out, or the last
    one ends within CUT_MARGIN of the cut, which is more than the longest token) the text is tokenized
    again whole, so the ids are always those of the whole text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer without character offsets: load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    bound = max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN
    out = _call_tokenizer(tokenizer, [text[:bound] for text in texts], max_length)
    redo = [
        i
        for i, (text, (ids, offsets)) in enumerate(zip(texts, out))
        if len(text) > bound and (len(ids) < max_length or offsets[-1][1] > bound - CUT_MARGIN)
    ]
    if redo:
        for i, whole in zip(redo, _call_tokenizer(tokenizer, [texts[i] for i in redo], max_length)):
            out[i] = whole
    return out


def _call_tokenizer(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], list[Span]]]:
    out = tokenizer(
        texts,
        add_special_tokens=False,  # the chat template already wrote any bos/eos it wants
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    return list(zip(out["input_ids"], out["offset_mapping"]))


def encode_conversation(tokenizer, conversation: Conversation, max_length: int) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one conversation, truncated to `max_length` tokens.

    labels[t] == input_ids[t] on assistant content and its end-of-turn token, -100 elsewhere.
    """
    _check_max_length(max_length)
    text, spans = render_with_spans(tokenizer, conversation)
    [(ids, offsets)] = _tokenize(tokenizer, [text], max_length)
    return {"input_ids": list(ids), "labels": labels_from_offsets(ids, offsets, spans)}


@dataclass
class EncodeStats:
    """Counts from `encode_dataset`, for the run's summary line."""

    n_conversations: int = 0
    n_kept: int = 0
    n_no_labels: int = 0  # no assistant token left after truncation
    n_template_errors: int = 0  # the chat template refused the conversation (e.g. role order)
    n_truncated: int = 0  # counted before dropping: texts that did not fit in max_length tokens
    n_tokens: int = 0
    n_label_tokens: int = 0

    def summary(self) -> str:
        return (
            f"encoded {self.n_kept}/{self.n_conversations} conversations: {self.n_tokens} tokens, "
            f"{self.n_label_tokens} labelled; {self.n_truncated} truncated, dropped {self.n_no_labels} "
            f"with no assistant token left and {self.n_template_errors} the chat template rejected"
        )


class EncodedDataset(list):
    """A list of `{"input_ids", "labels"}` dicts that also carries its `EncodeStats`."""

    def __init__(self, items=(), stats: EncodeStats | None = None):
        super().__init__(items)
        self.stats = stats


def encode_dataset(
    tokenizer, conversations: Sequence[Conversation], max_length: int, progress: bool = True
) -> EncodedDataset:
    """Encode many conversations (progress bar or lines); drop those left with no labelled token, and count them."""
    _check_max_length(max_length)
    stats = EncodeStats(n_conversations=len(conversations))
    encoded = EncodedDataset(stats=stats)
    bar = Progress(total=len(conversations), desc="encoding", unit="conv", enabled=progress)
    for first in range(0, len(conversations), TOKENIZE_BATCH):
        rendered = []
        for conversation in conversations[first : first + TOKENIZE_BATCH]:
            try:
                rendered.append(render_with_spans(tokenizer, conversation))
            except Exception as err:  # jinja raises its own types (e.g. "roles must alternate")
                stats.n_template_errors += 1
                logger.debug("chat template rejected a conversation: %s", err)
        tokenized = _tokenize(tokenizer, [text for text, _ in rendered], max_length) if rendered else []
        for (text, spans), (ids, offsets) in zip(rendered, tokenized):
            stats.n_truncated += bool(offsets) and offsets[-1][1] < len(text.rstrip())
            _keep(encoded, stats, list(ids), labels_from_offsets(ids, offsets, spans))
        bar.update(min(TOKENIZE_BATCH, len(conversations) - first))
    bar.close()
    logger.info(stats.summary())
    return encoded


def _keep(encoded: EncodedDataset, stats: EncodeStats, ids: list[int], labels: list[int]) -> None:
    n_labels = sum(label != IGNORE_INDEX for label in labels)
    if n_labels == 0:
        stats.n_no_labels += 1
        return
    stats.n_kept += 1
    stats.n_tokens += len(ids)
    stats.n_label_tokens += n_labels
    encoded.append({"input_ids": ids, "labels": labels})
