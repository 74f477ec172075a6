"""Writing output files atomically, with the modes a user expects (0666 minus the umask, as `open` gives)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0o666 without the process umask (usually 0o644)."""
    return 0o666 & ~_umask()


def parse_json(text: str):
    """`json.loads`, except that nesting too deep for the parser is a `json.JSONDecodeError` like any other
    broken JSON (a bare RecursionError would escape every handler that reports a bad file in one line)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


WRITE_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}  # "you cannot write there"


def not_writable(path: str | os.PathLike, err: OSError) -> OSError:
    """`err` of a write that failed for a reason the user can fix (read-only file system, permissions, a full
    disk) as a PermissionError naming `path` itself, not a temporary file beside it; other errors as they are."""
    if err.errno not in WRITE_ERRORS:
        return err
    return PermissionError(f"cannot write {path}: {err.strerror or err}; pass a location you can write to")


def written_name(filename: str) -> str:
    """The file a temporary of `atomic_output` / `atomic_directory` (`.NAME.xxxx.tmp`) stands for."""
    path = Path(filename)
    parts = path.name.split(".")
    if path.name.startswith(".") and path.name.endswith(".tmp") and len(parts) >= 4:
        return str(path.with_name(".".join(parts[1:-2])))
    return filename


def make_parent_directory(path: Path) -> None:
    """mkdir -p of `path`'s parent; a file in the way is named (not an errno about some ancestor)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
        where = f"{blocker} is a file, not a directory" if blocker else str(err)
        raise NotADirectoryError(f"cannot write {path}: {where}; pass another path") from err
    except OSError as err:
        raise not_writable(path, err) from err


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when nothing can be written where `path` (a file or a directory) would go: the
    nearest existing folder takes no new file (read-only file system, permissions), found by creating and removing one."""
    path = Path(path).expanduser().absolute()
    folder = next(p for p in (path, *path.parents) if p.is_dir())  # a directory output: that directory
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"{flag} {path}: {folder} is not writable ({err.strerror or err}); pass a location you can write to"
        ) from err


def json_object_keys(path: str | os.PathLike) -> set[str]:
    """The keys of the JSON object in `path`; empty for anything else (no file, not JSON, not an object). How a
    command tells its own earlier output, which it may replace, from a file it must not touch."""
    try:
        data = parse_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def is_benchmark_result(path: str | os.PathLike) -> bool:
    """Whether `path` holds a result of a `fastmedusa bench` command: a JSON object with its environment
    record (`env` or `environment`), which is what such a run may replace."""
    return bool({"env", "environment"} & json_object_keys(path))


def check_output_file(
    path: str | os.PathLike,
    flag: str = "--out",
    replaces: Callable[[Path], bool] | None = None,
    what: str = "an earlier `fastmedusa bench` result",
    beside: Sequence[str] = (),
    inputs: Sequence[str | os.PathLike | None] = (),
) -> None:
    """Fail before any work when `path` cannot become a file: it is a directory, a file stands where one of
    its folders would go, or its folder is not writable (found at the end of a long run, that would cost the
    run). With `replaces`, an existing file is written over only if `replaces(path)` says it is `what`; the
    files `beside` it (suffixes, such as the chart's ".png") only then, or when neither exists yet. `inputs`:
    files the run reads, never its output."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory: pass a file path, e.g. {path / 'out.json'}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"{flag} {path}: {blocker} is a file, not a directory; pass another path")
    for source in inputs:
        if source is not None and Path(source).expanduser().is_file() and path.exists():
            if path.resolve() == Path(source).expanduser().resolve():
                raise ValueError(f"{flag} {path} is the input file {source}: pass another path for the results")
    if replaces is not None:
        earlier = path.exists() and replaces(path)
        if path.exists() and not earlier:
            raise FileExistsError(
                f"{flag} {path} exists and is not {what}: pass a new path (only such a result is replaced)"
            )
        for suffix in beside:
            other = path.with_suffix(suffix)
            if other.exists() and not earlier:
                raise FileExistsError(
                    f"{flag} {path}: {other} exists beside it and would be replaced, but {path} is not {what}; "
                    "move it or pass another path"
                )
    check_writable(path, flag)


def check_output_directory(path: str | os.PathLike, flag: str = "--output") -> None:
    """Fail before any work when `path` cannot become a directory: a file stands there or above it."""
    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"{flag} {path}: {blocker} is a file, not a directory; pass another path")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds it becomes `path` in one rename.

    A reader never sees half a file, and a crash leaves the old file. `tempfile` creates its files with
    mode 0600; the file gets the usual mode before the rename, so others can read published weights.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: pass a file path, e.g. {path / 'out.json'}")
    make_parent_directory(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise not_writable(path, err) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: object) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; once the block succeeds it replaces `path`.

    A crash while writing leaves the previous directory whole, and removes the parent directories made for
    `path` (while empty). The swap is two renames: the old directory moves to `.NAME.old`, then the new one takes
    its name (if that fails, the old one is put back). A kill between the two leaves the old one at `.NAME.old`;
    `stale_directory_temporaries` lists what a kill left.
    """
    import shutil

    path = Path(path)
    made = [p for p in path.parents if not p.exists()]  # innermost first
    make_parent_directory(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise not_writable(path, err) from err
    try:
        yield tmp
        os.chmod(tmp, default_file_mode() | (0o111 & ~_umask()))  # mkdtemp gives 0700
        for file in tmp.rglob("*"):  # writers that go through mkstemp leave 0600 files: publish them readable
            if file.is_file():
                os.chmod(file, default_file_mode())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous directory back under its name
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                parent.rmdir()
        raise


def stale_directory_temporaries(path: str | os.PathLike) -> list[Path]:
    """What killed `atomic_directory` writes of `path` left beside it: `.NAME.*.tmp` and `.NAME.old`."""
    path = Path(path)
    return sorted([*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.old")])


def refused_by_weights_only(err: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused a pickle for holding objects other than tensors (rather
    than finding it truncated). Its message then advises weights_only=False, advice not to pass on for a file
    of unknown origin."""
    text = str(err).lower()
    return "weights only" in text and "global" in text  # bytes that are no pickle: "unsupported operand"


def absolute_if_local(path: str | os.PathLike) -> str:
    """A path that exists here, made absolute (the same file however it is typed, found from any directory);
    anything else (a hub id, "") as it is."""
    local = Path(path).expanduser()
    return str(local.resolve()) if str(path) and local.exists() else str(path)


def input_path(kind: str, value: str | os.PathLike | None) -> str | None:
    """A --model or --data value (`kind` "model" / "data") as runs record and compare it: None or a name of the
    embedded default (DEFAULT_ALIASES, "" included) as it is, whatever the current directory holds; a local
    path made absolute; a hub id as it is."""
    from fastmedusa.data.sharegpt import DEFAULT_ALIASES as DATA_ALIASES
    from fastmedusa.model.loading import DEFAULT_ALIASES as MODEL_ALIASES

    aliases = MODEL_ALIASES if kind == "model" else DATA_ALIASES
    if value is None or str(value).lower() in aliases:
        return value
    return absolute_if_local(value)


def shared_name(value: str | os.PathLike) -> str:
    """How heads meant to be shared name an input they only describe (their training data): a local file or
    directory by its name, without the machine's directories; a hub id or dataset name as it is."""
    local = Path(value).expanduser()
    return local.name if str(value) and local.exists() else str(value)
