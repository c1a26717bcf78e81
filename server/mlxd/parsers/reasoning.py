"""Splitting a model's ``<think>…</think>`` reasoning from its answer, as the text streams in.

Where reasoning starts: Qwen3 writes ``<think>`` itself at the start of its output (after
whitespace, at most); Qwen3.5/3.6 templates end the prompt with ``<think>\\n``, so the output
starts inside the reasoning. The chat service tells which from the rendered prompt
(:func:`prompt_opens_reasoning`), not from request flags, and builds the splitter with
``start_in_reasoning`` accordingly. Output that ends before ``</think>`` is all reasoning.

Newlines around the markers are template layout, not text (the templates write
``<think>\\n`` + reasoning + ``\\n</think>\\n\\n``), so the splitter drops

* the newlines that start the reasoning (right after ``<think>``, or at the start of the output
  when the prompt opened it),
* the newlines right before ``</think>``,
* the newlines right after ``</think>``, before the answer.

Other whitespace is kept. To drop the newlines before ``</think>`` the same way whatever the
chunking, a run of newlines at the end of the reasoning seen so far is kept back like the start
of a marker until the next other character shows it is not one. Whitespace before a leading
``<think>`` is dropped too. A ``<think>`` anywhere else is text, and so is a ``</think>`` once
the reasoning has ended.
"""

from __future__ import annotations

import enum

from mlxd.parsers.base import Split, held_tag_prefix

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_reasoning(rendered_prompt: str) -> bool:
    """True when the prompt's last ``<think>`` has no ``</think>`` after it.

    Then the model's output starts inside its reasoning.
    """
    start = rendered_prompt.rfind(THINK_OPEN)
    return start >= 0 and THINK_CLOSE not in rendered_prompt[start:]


class _State(enum.Enum):
    START = "start"  # nothing but whitespace yet: a <think> may still open reasoning
    REASONING_START = "reasoning_start"  # dropping newlines that open the reasoning
    REASONING = "reasoning"
    CONTENT_START = "content_start"  # dropping newlines after </think>
    CONTENT = "content"


class ThinkSplitter:
    """Push parser: ``feed`` text, get the reasoning and answer text that may be emitted now."""

    def __init__(self, start_in_reasoning: bool = False) -> None:
        self._state = _State.REASONING_START if start_in_reasoning else _State.START
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """True while the text fed so far ends inside the reasoning."""
        return self._state in (_State.REASONING_START, _State.REASONING)

    def feed(self, text: str) -> Split:
        out = Split()
        buf = self._held + text
        while True:
            state = self._state
            if state is _State.START:
                body = buf.lstrip()
                if body.startswith(THINK_OPEN):
                    buf = body[len(THINK_OPEN) :]
                    self._state = _State.REASONING_START
                elif not body or THINK_OPEN.startswith(body):
                    break
                else:
                    self._state = _State.CONTENT
            elif state in (_State.REASONING_START, _State.CONTENT_START):
                buf = buf.lstrip("\n")
                if not buf:
                    break
                self._state = (
                    _State.REASONING if state is _State.REASONING_START else _State.CONTENT
                )
            elif state is _State.REASONING:
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    out.reasoning += buf[:end].rstrip("\n")
                    buf = buf[end + len(THINK_CLOSE) :]
                    self._state = _State.CONTENT_START
                    continue
                keep = len(buf) - held_tag_prefix(buf, (THINK_CLOSE,))
                while keep > 0 and buf[keep - 1] == "\n":
                    keep -= 1
                out.reasoning += buf[:keep]
                buf = buf[keep:]
                break
            else:
                out.content += buf
                buf = ""
                break
        self._held = buf
        return out

    def finish(self) -> Split:
        """End of output: what was kept back is text after all (reasoning if inside it)."""
        held, self._held = self._held, ""
        if self.in_reasoning:
            return Split(reasoning=held)
        return Split(content=held)
