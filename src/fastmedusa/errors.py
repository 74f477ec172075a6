"""Errors a user can fix (a bad file, a full disk): the CLI prints them as one `error:` line, rc 2."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(Exception):
    """Base of errors whose message names the bad input and the fix; no traceback needed."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it says it already or there is none (None, a False
    flag). Zeros are defaults too (`0 in (None, False)` is True in Python, hence the identity tests)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        none = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or none or not action.option_strings:
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other bad input: `error: PROG: MESSAGE`, then
    where the flags are listed, exit code 2 (argparse's own prints the whole usage block first)."""

    def __init__(self, *args, formatter_class: type = DefaultsHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)  # every --help shows the defaults

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")
