"""Generated text of one request: incremental UTF-8 decoding and stop sequences.

``TextStream`` turns each generated token's raw bytes into the text fragment
that may be sent now:

* A token can end in the middle of a UTF-8 sequence; the incremental decoder
  holds the partial bytes back until the sequence completes (invalid bytes
  become U+FFFD, as ``errors="replace"`` does everywhere else).
* Stop sequences (REFERENCE §8.7, D11 R): after every token the accumulated
  text is searched for the **leftmost** match by text position; a tie (two
  stops starting at the same position) goes to the earlier list entry. Only
  text before the match is ever released. While no stop has matched, the
  last ``max_len - 1`` characters are held back (they could be the start of
  a match) and released by ``finish()``.

Alternatives turned down: matching on token ids (a stop string need not align
with token boundaries) and a regex alternation (Python's ``re`` prefers the
earlier alternative at the same position, which is the tie rule we want, but
the plain ``find`` loop is as fast for the handful of stops allowed and keeps
the rule explicit).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """The text of one request's generated tokens (see the module docstring)."""

    def __init__(self, stop_sequences: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop_sequences if isinstance(s, str) and s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._parts: list[str] = []
        self._text = ""
        self._released = 0
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """All text decoded so far (including held-back characters)."""
        return self._text

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the fragment that may be released now."""
        if self.matched is not None:
            return ""
        return self._add(self._decoder.decode(piece))

    def finish(self) -> str:
        """Flush the decoder and release everything still held back (no match: all of it)."""
        if self.matched is not None:
            return ""
        out = self._add(self._decoder.decode(b"", final=True))
        if self.matched is not None:
            return out
        rest = self._text[self._released :]
        self._released = len(self._text)
        return out + rest

    def _add(self, new: str) -> str:
        if not new:
            return ""
        old_len = len(self._text)
        self._text += new
        if not self._stops:
            self._released = len(self._text)
            return new
        # A match completed by this token starts at most max_len-1 characters back.
        start = max(0, old_len - self._hold)
        best: tuple[int, int] | None = None
        for i, stop in enumerate(self._stops):
            pos = self._text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, i)
        if best is not None:
            pos, i = best
            self.matched = self._stops[i]
            out = self._text[self._released : pos] if pos > self._released else ""
            self._released = max(self._released, pos)
            return out
        safe = len(self._text) - self._hold
        if safe <= self._released:
            return ""
        out = self._text[self._released : safe]
        self._released = safe
        return out


def cut_at_stop(reply: str, stop: str | None) -> str:
    """``reply`` cut at the first occurrence of the matched stop string."""
    if not stop:
        return reply
    pos = reply.find(stop)
    return reply if pos < 0 else reply[:pos]
