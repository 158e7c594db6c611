"""Text from a kernel on its way to the user's terminal.

Kernel code is not trusted, and a terminal obeys what it prints: escape sequences move the
cursor, rewrite the screen, set the window title, write the clipboard (OSC 52) or hide a link
(OSC 8). What ``hpc-kernel exec``, ``logs`` and ``status`` print to a terminal keeps only the
colours (IPython's tracebacks use them) and newline, tab and carriage return; to a file or a
pipe it goes as it came (tracebacks without their colours).
"""

from __future__ import annotations

import re
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour codes (tracebacks carry them)."""
    return _ANSI.sub("", text)


# What kernel output may not send to a terminal: escape sequences other than colours (SGR,
# "ESC [ ... m"): OSC (OSC 52 writes the clipboard, OSC 8 hides links), DCS, cursor and screen
# control, 8-bit C1 controls; and control characters other than newline, tab and carriage return.
_TERMINAL_UNSAFE = re.compile(
    r"\x1b\[[0-9;]*m"                                  # SGR: kept (see _keep)
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"     # OSC, DCS, SOS, PM, APC strings
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"                  # other CSI sequences (7- and 8-bit)
    r"|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # 8-bit DCS, SOS, OSC, PM, APC
    r"|\x1b[ -/]*[0-~]?"                                 # other escapes (and a lone ESC)
    r"|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f\x80-\x9f]"
)


def _keep(match: re.Match[str]) -> str:
    text = match.group(0)
    return text if re.fullmatch(r"\x1b\[[0-9;]*m", text) else ""


def for_terminal(text: str) -> str:
    """Kernel output made safe to show in a terminal: colours stay, other control goes."""
    return _TERMINAL_UNSAFE.sub(_keep, text)


def plain(text: str, stream: TextIO) -> str:
    """Tracebacks carry ANSI colours; keep them for a terminal, drop them for files and pipes."""
    return for_terminal(text) if stream.isatty() else strip_ansi(text)


def shown(text: str, stream: TextIO) -> str:
    """Output of the kernel as it goes to ``stream``: for a terminal without what could act on it."""
    return for_terminal(text) if stream.isatty() else text
