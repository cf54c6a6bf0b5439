"""Sentence-sized pieces of a reply while it is still being decoded, so speech starts early."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (possibly repeated, possibly closed by a quote or bracket) followed by
# whitespace. The end of the text is not a boundary while decoding goes on ("3." may be "3.5").
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+")


class SentenceSplitter:
    """Feed it the whole reply text so far after each token; it returns the sentences completed
    since the last call. `finish(final_text)` returns what is left to say.

    Pieces shorter than `min_chars` ("1.", "Ok.") are held back and joined to the next sentence.
    If the text changes before the part already said (the model wrote text before its reply
    header, which `reply_text` drops once the header is complete), nothing more is emitted until
    `finish`, which then returns the whole final text: the reply is never cut short.
    """

    def __init__(self, min_chars: int = 8) -> None:
        self.min_chars = min_chars
        self._said = ""  # the raw prefix of the text already emitted, up to a boundary
        self._diverged = False

    def update(self, text: str) -> list[str]:
        if self._diverged or not text.startswith(self._said):
            self._diverged = True
            return []
        pieces: list[str] = []
        start = len(self._said)
        for m in _BOUNDARY.finditer(text, start):
            piece = text[start : m.end()].strip()
            if len(piece) < self.min_chars:
                continue
            pieces.append(piece)
            start = m.end()
        self._said = text[:start]
        return pieces

    def finish(self, text: str) -> str:
        """What is left of the final reply (all of it if the text diverged); resets."""
        if self._diverged or not text.startswith(self._said):
            rest = text
        else:
            rest = text[len(self._said) :]
        self._said, self._diverged = "", False
        return rest.strip()
