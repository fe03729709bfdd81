"""User-facing errors: one line, naming the file and the problem; the CLI maps them to exit 2. Warnings:
one line on stderr in the same form."""

from __future__ import annotations

import os
import sys
from typing import IO


class MobeError(Exception):
    """An error caused by the user's input or environment, printed as one line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(MobeError):
    """A model directory, shard, header, index or config is missing, corrupt or unsupported."""


class ConfigError(MobeError):
    """Options or settings that cannot work together (or differ from a run being resumed)."""


class ResourceError(MobeError):
    """Not enough disk, RAM or device memory for the planned work."""


class PeerError(MobeError):
    """Another process of a distributed run died or stopped answering during a collective."""


def say(line: str, stream: IO[str] | None = None) -> None:
    """One line on `stream` (stderr) in one write: print() writes the text and its newline
    separately, so the lines of torchrun ranks sharing one stderr could interleave mid-line."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


def warning(message: str, path: str | os.PathLike | None = None) -> None:
    """A warning as users see one: one line on stderr, naming the file when there is one (the runtime's
    default sink; pipeline code reports warnings as events instead)."""
    say(f"warning: {os.fspath(path)}: {message}" if path else f"warning: {message}")
