"""Hermes-style tool calls (``<tool_call>…</tool_call>``) out of streamed model text.

Two bodies are understood inside the envelope, told apart by their first character:

* JSON (Qwen2.5, Qwen3): ``{"name": "f", "arguments": {…}}``. The call ends where the JSON
  object ends (strings and escapes are tracked, so a string may hold ``</tool_call>`` or
  braces), then the closing tag. Once the name is known, the arguments object's text is
  streamed as it arrives, as the model wrote it, except that raw control characters inside
  strings are escaped so the joined text is strict JSON. ``"parameters"`` is read as
  ``"arguments"``; arguments given as a string holding JSON, null or missing become that object
  or ``{}``, sent when the object ends.
* XML (Qwen3.5/3.6, Qwen3-Coder): ``<function=f><parameter=p>value</parameter>…</function>``.
  A value is raw text (one leading and one trailing newline are layout and dropped); its JSON
  type comes from the tool's schema in the request (``integer``, ``number``, ``boolean``,
  ``object``, ``array``, ``null``), falling back to a string when the text does not parse as one
  of them. Arguments are streamed one parameter at a time, as each one ends.

Several calls in a row are parallel calls, numbered from 0. Text around them is content; the
whitespace right after a call's closing tag is layout and dropped. A call whose closing tag is
missing is accepted when the next thing is another ``<tool_call>`` or the end of the output.

Nothing is lost: a call that turns out malformed is given back as content, tags and all, in
place; if its deltas were already out (its name was known first), its index is listed in
``ToolParse.invalidated`` and :attr:`HermesToolParser.invalid_calls`. A call cut off by the end
of the output sets :attr:`HermesToolParser.truncated`; its text becomes content if nothing of it
was emitted, otherwise :attr:`HermesToolParser.incomplete_call` names its index (its arguments
are unfinished JSON).
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from mlxd.parsers.base import ToolCallDelta, ToolParse, held_tag_prefix

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"

_ARGUMENT_KEYS = ("arguments", "parameters")
# Characters that may appear in JSON outside strings; anything else means the call is broken.
_JSON_OUTSIDE_STRINGS = frozenset(' \t\n\r{}[],:"0123456789+-.eEtruefalsn')
# Inside a string only these need a look: the end, an escape, a raw control character.
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


class _Status(enum.Enum):
    OPEN = "open"  # more text may belong to the call
    DONE = "done"  # a valid call
    BROKEN = "broken"  # malformed: its text goes back as content
    TRUNCATED = "truncated"  # the output ended inside it


class _Call:
    """One call after ``<tool_call>``: the text it consumed, its name and argument text.

    ``raw`` always holds the call's original text from ``<tool_call>`` on, so a broken or
    truncated call can be given back as content unchanged.
    """

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.status = _Status.OPEN
        self.name: str | None = None
        self.index: int | None = None
        self._arguments: list[str] = []

    def feed(self, text: str) -> str:
        """Consume `text`; return what follows the call once it is no longer open."""
        self.raw += text
        end = self._scan()
        if end is None:
            return ""
        rest = self.raw[end:]
        self.raw = self.raw[:end]
        return rest

    def take_arguments(self) -> str:
        """Argument text not handed out yet; nothing until the name is known."""
        if self.name is None:
            return ""
        text = "".join(self._arguments)
        self._arguments.clear()
        return text

    def finish(self) -> None:
        raise NotImplementedError

    def _scan(self) -> int | None:
        """Read the new text in ``raw``; return where the call's text ends once it is not open."""
        raise NotImplementedError

    def _close_tail(self, at: int) -> int | None:
        """After a complete body: whitespace, then the closing tag (or a next call's opening)."""
        text = self.raw[at:]
        body = text.lstrip()
        skipped = at + len(text) - len(body)
        if body.startswith(TOOL_CLOSE):
            self.status = _Status.DONE
            return skipped + len(TOOL_CLOSE)
        if body.startswith(TOOL_OPEN):
            self.status = _Status.DONE
            return skipped
        if not body or held_tag_prefix(body, (TOOL_CLOSE, TOOL_OPEN)) == len(body):
            return None
        self.status = _Status.BROKEN
        return skipped


class _JsonCall(_Call):
    """``{"name": …, "arguments": {…}}``, scanned one structural character at a time."""

    def __init__(self, raw: str) -> None:
        super().__init__(raw)
        self._object_start = len(raw)
        self._pos = len(raw)  # everything before it is scanned
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._expect_key = False
        self._key: str | None = None  # the top-level key whose value is being read
        self._string_start = 0
        self._arguments_key: str | None = None
        self._capturing = False  # inside the arguments object
        self._streamed: list[str] = []  # every piece of argument text, to check at the end
        self._tail_start: int | None = None  # set once the object ended and is valid

    def finish(self) -> None:
        self.status = _Status.DONE if self._tail_start is not None else _Status.TRUNCATED

    def _keep(self, text: str) -> None:
        if self._capturing:
            self._arguments.append(text)
            self._streamed.append(text)

    def _scan(self) -> int | None:
        if self._tail_start is not None:
            return self._close_tail(self._tail_start)
        raw = self.raw
        i = self._pos
        self._pos = len(raw)
        while i < len(raw):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    self._keep(raw[i])
                    i += 1
                    continue
                match = _STRING_STOP.search(raw, i)
                stop = match.start() if match else len(raw)
                self._keep(raw[i:stop])
                if match is None:
                    break
                char = raw[stop]
                i = stop + 1
                if char == "\\":
                    self._escaped = True
                    self._keep(char)
                elif char == '"':
                    self._in_string = False
                    self._keep(char)
                    if self._depth == 1:
                        self._top_level_string(raw[self._string_start : i])
                else:
                    self._keep(_CONTROL_ESCAPES.get(char, f"\\u{ord(char):04x}"))
                continue
            char = raw[i]
            if char not in _JSON_OUTSIDE_STRINGS:
                self.status = _Status.BROKEN
                return i
            if char == '"':
                self._in_string = True
                self._string_start = i
            elif char in "{[":
                if self._depth == 0:
                    self._expect_key = True
                elif (
                    self._depth == 1
                    and char == "{"
                    and self._key in _ARGUMENT_KEYS
                    and self._arguments_key is None
                ):
                    self._arguments_key = self._key
                    self._capturing = True
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._object_ended(i + 1)
            elif self._depth == 1 and char == ",":
                self._expect_key = True
                self._key = None
            self._keep(char)
            if self._capturing and self._depth == 1:
                self._capturing = False
            i += 1
        return None

    def _top_level_string(self, literal: str) -> None:
        """A key of the call object, or the value of its ``name``."""
        try:
            value = json.loads(literal, strict=False)
        except ValueError:
            return  # a bad escape: the check at the object's end reports it
        if self._expect_key:
            self._key = value
            self._expect_key = False
        elif self._key == "name" and self.name is None and value:
            self.name = value

    def _object_ended(self, end: int) -> int | None:
        """Check the whole object against what was streamed; then wait for the closing tag."""
        try:
            call = json.loads(self.raw[self._object_start : end], strict=False)
        except ValueError:
            call = None
        arguments = self._final_arguments(call)
        if arguments is None:
            self.status = _Status.BROKEN
            return end
        self._arguments.append(arguments)
        self._tail_start = end
        return self._close_tail(end)

    def _final_arguments(self, call: Any) -> str | None:
        """Argument text still to send, or None when the object is not a valid call."""
        if not isinstance(call, dict) or not call.get("name") or call["name"] != self.name:
            return None
        if self._arguments_key is not None:
            # Duplicate keys would make the streamed text differ from what the object says.
            try:
                streamed = json.loads("".join(self._streamed))
            except ValueError:
                return None
            return "" if streamed == call[self._arguments_key] else None
        key = next((k for k in _ARGUMENT_KEYS if k in call), None)
        value = call.get(key) if key else None
        if value is None:
            return "{}"
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        return json.dumps(value, ensure_ascii=False)


class _XmlStage(enum.Enum):
    FUNCTION = "function"  # expecting <function=NAME>
    BODY = "body"  # between parameters
    VALUE = "value"  # inside a parameter's value
    TAIL = "tail"  # after </function>


_FUNCTION_OPEN = "<function="
_FUNCTION_CLOSE = "</function>"
_PARAMETER_OPEN = "<parameter="
_PARAMETER_CLOSE = "</parameter>"
# A value ends at its closing tag or, when the model left that out, where the next thing starts.
_VALUE_ENDS = (_PARAMETER_CLOSE, _PARAMETER_OPEN, _FUNCTION_CLOSE, TOOL_CLOSE)
_VALUE_END = re.compile("|".join(map(re.escape, _VALUE_ENDS)))
_LONGEST_VALUE_END = max(map(len, _VALUE_ENDS))


class _XmlCall(_Call):
    """``<function=NAME><parameter=P>value</parameter>…</function>``."""

    def __init__(self, raw: str, schemas: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(raw)
        self._schemas = schemas
        self._stage = _XmlStage.FUNCTION
        self._pos = len(raw)  # everything before it is consumed
        self._parameter = ""
        self._search_from = 0
        self._any_parameter = False

    def finish(self) -> None:
        self.status = _Status.DONE if self._stage is _XmlStage.TAIL else _Status.TRUNCATED

    def _scan(self) -> int | None:
        while True:
            stage = self._stage
            if stage is _XmlStage.VALUE:
                if not self._read_value():
                    return None
                continue
            if stage is _XmlStage.TAIL:
                return self._close_tail(self._pos)
            text = self.raw[self._pos :]
            body = text.lstrip() if stage is _XmlStage.BODY else text
            at = self._pos + len(text) - len(body)
            if stage is _XmlStage.FUNCTION:
                tags: tuple[str, ...] = (_FUNCTION_OPEN,)
            else:
                tags = (_PARAMETER_OPEN, _FUNCTION_CLOSE, TOOL_CLOSE)
            tag = next((t for t in tags if body.startswith(t)), None)
            if tag is None:
                if not body or held_tag_prefix(body, tags) == len(body):
                    return None
                self.status = _Status.BROKEN
                return at
            if tag == _FUNCTION_CLOSE:
                self._close_arguments()
                self._pos = at + len(tag)
                self._stage = _XmlStage.TAIL
                continue
            if tag == TOOL_CLOSE:  # </function> left out
                self._close_arguments()
                self.status = _Status.DONE
                return at + len(tag)
            close = body.find(">", len(tag))
            name = body[len(tag) : close if close >= 0 else len(body)]
            if "<" in name or "\n" in name or (close >= 0 and not name.strip()):
                self.status = _Status.BROKEN
                return at
            if close < 0:
                return None
            self._pos = at + close + 1
            if tag == _FUNCTION_OPEN:
                self.name = name.strip()
                self._stage = _XmlStage.BODY
            else:
                self._parameter = name.strip()
                self._search_from = self._pos
                self._stage = _XmlStage.VALUE

    def _read_value(self) -> bool:
        """Finish the current value if its end is in sight; False to wait for more text."""
        match = _VALUE_END.search(self.raw, self._search_from)
        if match is None:
            self._search_from = max(self._pos, len(self.raw) - _LONGEST_VALUE_END + 1)
            return False
        value = self.raw[self._pos : match.start()]
        value = value.removeprefix("\n").removesuffix("\n")
        schema = self._schemas.get(self.name or "", {}).get(self._parameter)
        piece = (
            f"{json.dumps(self._parameter, ensure_ascii=False)}: "
            f"{json.dumps(typed_value(value, schema), ensure_ascii=False)}"
        )
        self._arguments.append((", " if self._any_parameter else "{") + piece)
        self._any_parameter = True
        self._pos = match.end() if match.group() == _PARAMETER_CLOSE else match.start()
        self._stage = _XmlStage.BODY
        return True

    def _close_arguments(self) -> None:
        self._arguments.append("}" if self._any_parameter else "{}")


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set()
    if isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            if isinstance(option, Mapping):
                types |= _schema_types(option)
    return types


_TYPE_ORDER = ("integer", "number", "boolean", "object", "array", "null")


def _fits(value: Any, types: set[str]) -> Any:
    """`value` as the first schema type it fits (in a fixed order), or raise ValueError."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in (t for t in _TYPE_ORDER if t in types):
        if kind == "integer" and is_number and float(value).is_integer():
            return int(value)
        if (
            (kind == "number" and is_number)
            or (kind == "boolean" and isinstance(value, bool))
            or (kind == "object" and isinstance(value, dict))
            or (kind == "array" and isinstance(value, list))
            or (kind == "null" and value is None)
        ):
            return value
    raise ValueError(f"{value!r} is none of {sorted(types)}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def typed_value(text: str, schema: Mapping[str, Any] | None) -> Any:
    """An XML parameter's raw text as the JSON value its schema asks for.

    Unknown parameters and string-typed ones stay strings; for other types the text is read as
    JSON (``True``/``False`` too) and kept only if it fits one of them, else it stays a string.
    """
    types = _schema_types(schema) if isinstance(schema, Mapping) else set()
    if not types or "string" in types:
        if "null" in types and text.strip() == "null":
            return None
        return text
    candidate = text.strip()
    if candidate in ("True", "False"):
        candidate = candidate.lower()
    try:
        return _fits(json.loads(candidate, parse_constant=_no_constants), types)
    except ValueError:
        return text


def parameter_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Function name → {parameter name → JSON schema}, from an OpenAI request's ``tools``."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        schemas[function["name"]] = dict(properties) if isinstance(properties, Mapping) else {}
    return schemas


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class HermesToolParser:
    """Push parser: ``feed`` content text, get the content and tool-call deltas to emit now.

    Attributes, read after ``finish()`` (they also grow while feeding):

    * ``call_count``: valid calls produced.
    * ``invalid_calls``: indices whose deltas were emitted but whose call turned out malformed.
    * ``malformed_count``: malformed calls given back as content (with or without an index).
    * ``truncated``: the output ended inside a call.
    * ``incomplete_call``: index of that call when its deltas were already out, else None.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._schemas = parameter_schemas(tools)
        self._held = ""
        self._opening: str | None = None  # text after <tool_call> while its format is unknown
        self._call: _Call | None = None
        self._after_call = False
        self._next_index = 0
        self.call_count = 0
        self.invalid_calls: list[int] = []
        self.malformed_count = 0
        self.truncated = False
        self.incomplete_call: int | None = None

    def feed(self, text: str) -> ToolParse:
        out = ToolParse()
        buf = self._held + text
        self._held = ""
        while buf:
            if self._call is not None:
                rest = self._call.feed(buf)
                self._emit(out)
                if self._call.status is _Status.OPEN:
                    break
                self._end_call(out)
                buf = rest
            elif self._opening is not None:
                buf = self._open_call(out, self._opening + buf)
            else:
                if self._after_call:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self._after_call = False
                start = buf.find(TOOL_OPEN)
                if start < 0:
                    keep = len(buf) - held_tag_prefix(buf, (TOOL_OPEN,))
                    out.content += buf[:keep]
                    self._held = buf[keep:]
                    break
                out.content += buf[:start]
                self._opening = ""
                buf = buf[start + len(TOOL_OPEN) :]
        return out

    def finish(self) -> ToolParse:
        """End of output: flush held text; a call still open is complete or truncated."""
        out = ToolParse(content=self._held)
        self._held = ""
        if self._opening is not None:
            out.content += TOOL_OPEN + self._opening
            self._opening = None
            self.truncated = True
        elif self._call is not None:
            self._call.finish()
            self._emit(out)
            self._end_call(out)
        return out

    def _open_call(self, out: ToolParse, text: str) -> str:
        """Pick the call's format from its first character; return the text left to read."""
        body = text.lstrip()
        if not body:
            self._opening = text
            return ""
        self._opening = None
        raw = TOOL_OPEN + text[: len(text) - len(body)]
        if body[0] == "{":
            self._call = _JsonCall(raw)
        elif body[0] == "<":
            self._call = _XmlCall(raw, self._schemas)
        else:
            out.content += raw
            out.malformed = True
            self.malformed_count += 1
        return body

    def _emit(self, out: ToolParse) -> None:
        call = self._call
        assert call is not None
        if call.index is None:
            if call.name is None:
                return
            call.index = self._next_index
            self._next_index += 1
            out.calls.append(ToolCallDelta(call.index, _new_call_id(), call.name, ""))
        arguments = call.take_arguments()
        if arguments:
            out.add_arguments(call.index, arguments)

    def _end_call(self, out: ToolParse) -> None:
        call = self._call
        assert call is not None
        self._call = None
        if call.status is _Status.DONE:
            self.call_count += 1
            self._after_call = True
        elif call.status is _Status.BROKEN:
            out.content += call.raw
            out.malformed = True
            self.malformed_count += 1
            if call.index is not None:
                out.invalidated.append(call.index)
                self.invalid_calls.append(call.index)
        else:
            self.truncated = True
            if call.index is None:
                out.content += call.raw
            else:
                self.incomplete_call = call.index
