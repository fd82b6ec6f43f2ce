"""Stop strings (OpenAI's and vLLM's `stop`): generation ends once the decoded output contains one.

Checked after every token of a request that has them, so the check must not grow with the output: a
stop string first seen at the newest token lies within the last `window` tokens (every token is at
least one byte, so a string of n UTF-8 bytes ends within the last n tokens, plus one for the byte a
split character may leave undecoded before it). The result's text then ends before the first stop
string, which is not included (as OpenAI returns it).
"""

from __future__ import annotations

from typing import Callable


class StopStrings:
    def __init__(self, strings: tuple[str, ...], decode: Callable[[list[int]], str]):
        self.strings, self.decode = strings, decode
        self.window = max(len(s.encode()) for s in strings) + 1

    def hit(self, generated: list[int]) -> bool:
        """Whether the output so far contains a stop string (its newest token completed it)."""
        tail = self.decode(generated[-self.window:])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        """`text` up to (not including) the first stop string in it; all of it when none is."""
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(ends)] if ends else text
