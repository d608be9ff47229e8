"""Token ids to streamed text: whole characters only, and nothing past a stop sequence."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_PARTIAL = "\ufffd"


class TextStream:
    """Turns one sequence's generated token ids into text deltas as they arrive.

    The text is the generation's decoded tokens, emitted as it grows; a character whose bytes span
    several tokens is never split (trailing U+FFFD, what an incomplete character decodes to, waits for
    the next token). Text that could be the start of a stop sequence is held back until it is known
    not to be one; a completed stop sequence ends the text before it.

    Decoding is incremental, as in vLLM and TGI, instead of decoding the whole generation at every
    token: a token decodes the tokens since the last whole character after the piece before them as
    context, and the context's own text is cut from the front (so a tokenizer that treats a leading
    space specially still joins the pieces as the whole generation would decode).

    Args:
        decode: Turns token ids into text (special tokens skipped, no clean-up of spaces).
        stop: Stop sequences (non-empty strings).

    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0  # characters of _text already emitted
        # ids[:read] decode to _committed, ending in whole characters; ids[context:read] is the context
        # the next tokens are decoded after, and _context_text its own decoded text (None: not yet).
        self._committed = ""
        self._context = self._read = 0
        self._context_text: str | None = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token.

        Returns:
            (text to emit now, whether a stop sequence was completed). After a stop, nothing more is
            emitted.

        """
        self._ids.append(token_id)
        tail = self._decode_new()  # may commit text first
        self._text = self._committed + tail
        # Held-back text never contains a full stop sequence's start in emitted text, so searching the
        # unemitted tail finds every stop.
        hit = self._first_stop()
        if hit is not None:
            delta = self._text[self._emitted : hit]
            self._text = self._text[:hit]
            self._emitted = hit
            return delta, True
        end = len(self._text)
        while end > self._emitted and self._text[end - 1] == _PARTIAL:
            end -= 1
        end -= self._stop_prefix_length(end)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta, False

    def flush(self) -> str:
        """Return the text still held back (at the end of the generation)."""
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return delta

    @property
    def text(self) -> str:
        """The generated text so far (cut before a stop sequence once one was found)."""
        return self._text

    def _decode_new(self) -> str:
        """Text of the tokens after `read`; once it ends in whole characters, it is committed."""
        if self._context_text is None:
            self._context_text = self._decode(self._ids[self._context : self._read])
        window = self._decode(self._ids[self._context :])
        new = window[len(self._context_text) :]
        if new and not new.endswith(_PARTIAL):
            self._committed += new
            self._context, self._read = self._read, len(self._ids)
            self._context_text = None
            return ""
        return new

    def _first_stop(self) -> int | None:
        found = [i for s in self._stop if (i := self._text.find(s, self._emitted)) >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self, end: int) -> int:
        """Length of the longest tail of text[emitted:end] that is a proper prefix of a stop sequence."""
        longest = max((len(s) for s in self._stop), default=0)
        for k in range(min(longest - 1, end - self._emitted), 0, -1):
            tail = self._text[end - k : end]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


def locked_decoder(tokenizer: object, lock: threading.Lock) -> Callable[[Sequence[int]], str]:
    """Make a decode function for TextStream that shares the tokenizer safely between threads.

    Hugging Face fast tokenizers raise "Already borrowed" when one thread decodes while another encodes,
    so every use of the engine's tokenizer goes through one lock.
    """

    def decode(ids: Sequence[int]) -> str:
        with lock:
            return tokenizer.decode(  # type: ignore[attr-defined]
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )

    return decode
