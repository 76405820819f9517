"""Where the ``nap`` command's output goes.

As text, for people: a command's result on stdout; log lines, progress and errors on stderr. With
``--json``, for programs: exactly one JSON document on stdout, whatever happens. It is the result, or,
when the command fails (exit code not 0), ``{"error": <kind>, "message": <text>, ...}``, the API's own
error kinds (``not_found``, ``bad_request``, ...) or the command's (``usage``, ``job_failed``,
``interrupted``, ...). Log lines and progress still go to stderr, never to stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


class CommandError(Exception):
    """A failure of the command itself (not of the API): a bad combination of arguments, a job that
    failed. ``kind`` names it in the JSON document; ``code`` is the exit code."""

    def __init__(self, kind: str, message: str, code: int = 1, **extra: Any):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.extra = extra


class Output:
    """The command's two streams, and whether it speaks JSON. In JSON, a second document is a bug of
    the command: it raises rather than print one."""

    def __init__(self, json_mode: bool):
        self.json = json_mode
        self.printed = False  # the JSON document is out

    @property
    def out(self) -> TextIO:  # looked up at each use: tests capture sys.stdout after we start
        return sys.stdout

    @property
    def err(self) -> TextIO:
        return sys.stderr

    def result(self, data: Any, text: str | None = None) -> int:
        """The command's result: ``data`` as JSON, else ``text`` (``data`` as JSON when it has none)."""
        if self.json or text is None:
            self._document(data)
        else:
            print(text, file=self.out, flush=True)
        return 0

    def error(self, kind: str, message: str, code: int = 1, **extra: Any) -> int:
        """A failure: the document ``{"error", "message", ...extra}`` in JSON, else ``error: message`` on
        stderr; returns the exit code."""
        if self.json:
            if not self.printed:  # a command that failed after its result (Ctrl-C at the end) keeps it
                self._document({"error": kind, "message": message, **extra})
        else:
            print(f"error: {message}", file=self.err, flush=True)
        return code

    def summary(self, text: str) -> None:
        """A line of what a job came to: part of the result as text; in JSON the document holds it."""
        print(text, file=self.err if self.json else self.out, flush=True)

    def note(self, text: str) -> None:
        """A line for the person watching: stderr, in either mode."""
        print(text, file=self.err, flush=True)

    def _document(self, data: Any) -> None:
        if self.printed:
            raise RuntimeError("a command printed a second JSON document")
        self.printed = self.json
        print(json.dumps(data, indent=2), file=self.out, flush=True)
