"""Text that came from a VM, made safe to show a person: in a log line, an error, a result.

The job (and anyone with a shell on its VM) controls what it prints and how its files are named.
Shown raw, a line can move the cursor, clear the screen, or end in a carriage return that
overwrites the log's own prefix with ``teardown clean``; a file name can carry a newline that
starts a fake log record. And a job may print the secret it was given. So, before anything from
the VM reaches a log, an exception or a result::

    shown = printable(redact(line, secrets))   # "\\x1b[2K\\rteardown clean" -> visible escapes

Files the job wrote keep their bytes (only the job's stdout/stderr copies are redacted).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

#: Shown in place of a secret's value.
REDACTED = "***"

# Bidirectional overrides and isolates reorder what a terminal shows ("Trojan source").
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character (ESC, CR, newline, BEL, ...), line separator and
    bidi override written as a visible escape; tabs kept."""
    return "".join(
        _escape(ch) if ch != "\t" and (ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")) else ch
        for ch in text)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret value (and each line of a multi-line one) replaced by ``***``."""
    pieces = {piece for value in secrets if value for piece in [value, *value.splitlines()] if piece.strip()}
    for piece in sorted(pieces, key=len, reverse=True):  # the whole value before its parts
        text = text.replace(piece, REDACTED)
    return text
