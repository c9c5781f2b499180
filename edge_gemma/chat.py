"""Gemma 4 chat format: render messages with the checkpoint's own chat template, parse the model's answer back.

This module owns the prompt format for the whole project (engine, ``listen``, the Android app's Kotlin port).

Rendering (:func:`render`) runs the checkpoint's ``chat_template.jinja`` in jinja2's
``ImmutableSandboxedEnvironment`` with the options and globals ``transformers`` uses (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``, ``strftime_now``, ``namespace``), because a
template is code from a downloaded file: the sandbox refuses access to Python internals (``__class__``,
``__globals__`` ...) and raises :class:`ChatTemplateError`. What the template sees is rebuilt from plain JSON types
(media objects become an inert placeholder string), as ``transformers`` does. Rendering is bounded: at most
``MAX_RENDER_CHARS`` of output and ``RENDER_SECONDS`` of time (in the main thread, where a timer signal can stop a
loop that prints nothing), ``*`` and ``**`` refused when they would build a value beyond that size, and a runaway
recursion reported: each a :class:`ChatTemplateError` naming what was exceeded.

Message format (the Hugging Face one the template expects)::

    {"role": "system" | "developer" | "user" | "assistant",
     "content": "text" | [{"type": "text", "text": ...}, {"type": "image", ...}, {"type": "audio", ...}],
     "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}}],      # assistant only
     "tool_responses": [{"name": ..., "response": {...}}]}                                      # assistant only

The template writes an image as ``\\n\\n<|image|>\\n\\n`` and an audio clip as ``<|audio|>``; the processor expands each
placeholder into ``<|image>`` + N x ``<|image|>`` + ``<image|>`` (and the audio equivalent) once the media are measured.

Parsing (:func:`parse_response`): the model writes its thinking as ``<|channel>thought\\n...<channel|>`` and tool
calls as ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` where strings are wrapped in ``<|"|>`` and keys are
bare identifiers. The arguments are read with a small recursive-descent parser (not the regex-to-JSON rewrite of
the HF response schema, which breaks on strings that contain ``,key:``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

logger = logging.getLogger(__name__)

__all__ = [
    "ChatFormatError",
    "ChatTemplateError",
    "Response",
    "ToolCall",
    "ToolCallParseError",
    "parse_arguments",
    "parse_response",
    "render",
    "validate_messages",
    "validate_tools",
]

ROLES = ("system", "developer", "user", "assistant")
CONTENT_TYPES = ("text", "image", "audio", "video")
_JSON_SCHEMA_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")

# Format strings of the Gemma 4 chat format (the same strings as tokenizer.SPECIAL_TOKEN_STRINGS).
ESCAPE = '<|"|>'
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"
TURN_END = "<turn|>"


class ChatFormatError(ValueError):
    """A message, content item or tool declaration is malformed; the message names which one and why."""


class ChatTemplateError(ValueError):
    """The chat template failed to compile or render, or tried to leave the sandbox."""


class ToolCallParseError(ValueError):
    """A ``<|tool_call>`` block the model wrote cannot be read."""


# ---------------------------------------------------------------------------------------------- validation
def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Check roles, content items and assistant tool fields; raise :class:`ChatFormatError` naming the message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages: expected a list of dicts, found {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages: the conversation is empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"{where}: expected a dict, found {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            hint = ""
            if role == "tool":
                hint = " (Gemma 4 puts tool results in an assistant message's `tool_responses` list)"
            raise ChatFormatError(f"{where}.role: unknown role {role!r}, expected one of {list(ROLES)}{hint}")
        if role in ("system", "developer") and i != 0:
            raise ChatFormatError(f"{where}: a {role} message must be the first message (the template reads only that one)")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, Sequence):
                raise ChatFormatError(f"{where}.content: expected str or list of items, found {type(content).__name__}")
            for j, item in enumerate(content):
                if not isinstance(item, Mapping):
                    raise ChatFormatError(f"{where}.content[{j}]: expected a dict, found {type(item).__name__}")
                kind = item.get("type")
                if kind not in CONTENT_TYPES:
                    raise ChatFormatError(
                        f"{where}.content[{j}].type: unknown content type {kind!r}, expected one of {list(CONTENT_TYPES)}"
                    )
                if kind == "text" and not isinstance(item.get("text"), str):
                    raise ChatFormatError(f"{where}.content[{j}].text: expected str, found {type(item.get('text')).__name__}")
                if role in ("system", "developer") and kind != "text":
                    raise ChatFormatError(f"{where}.content[{j}]: a {role} message may hold text only, found {kind!r}")
            if role in ("system", "developer"):
                raise ChatFormatError(f"{where}.content: the Gemma 4 template needs a system prompt as a plain string")
        for key in ("tool_calls", "tool_responses"):
            if message.get(key) and role != "assistant":
                raise ChatFormatError(f"{where}.{key}: only assistant messages carry {key}, found role {role!r}")
        for j, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ChatFormatError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name': str, 'arguments': dict}}}}")
            if not isinstance(function.get("arguments", {}), (Mapping, str)):
                raise ChatFormatError(f"{where}.tool_calls[{j}].function.arguments: expected dict or str")
        for j, resp in enumerate(message.get("tool_responses") or ()):
            if not isinstance(resp, Mapping) or "response" not in resp:
                raise ChatFormatError(f"{where}.tool_responses[{j}]: expected {{'name': str, 'response': ...}}")


def _validate_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, Mapping):
        raise ChatFormatError(f"{where}: expected a JSON schema object, found {type(schema).__name__}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if not isinstance(k, str) or k.lower() not in _JSON_SCHEMA_TYPES:
            raise ChatFormatError(f"{where}.type: expected one of {list(_JSON_SCHEMA_TYPES)}, found {k!r}")
    lowered = [k.lower() for k in kinds]
    if "object" in lowered and "properties" in schema:
        props = schema["properties"]
        if not isinstance(props, Mapping):
            raise ChatFormatError(f"{where}.properties: expected a dict of schemas, found {type(props).__name__}")
        for name, sub in props.items():
            if not isinstance(name, str) or not name:
                raise ChatFormatError(f"{where}.properties: property names must be non-empty strings, found {name!r}")
            _validate_schema(sub, f"{where}.properties.{name}")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ChatFormatError(f"{where}.required: expected a list of property names, found {required!r}")
        unknown = [r for r in required if r not in props]
        if unknown:
            raise ChatFormatError(f"{where}.required: {unknown} not among the properties {list(props)}")
    if "array" in lowered and "items" in schema:
        _validate_schema(schema["items"], f"{where}.items")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ChatFormatError(f"{where}.enum: expected a list, found {type(schema['enum']).__name__}")


def validate_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Check OpenAI/HF-style function declarations; a bare ``{"name", "parameters"}`` is wrapped in
    ``{"type": "function", "function": ...}``. Returns the declarations the template expects."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatFormatError(f"tools: expected a list of function declarations, found {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ChatFormatError(f"{where}: expected a dict (a JSON-schema function declaration), found {type(tool).__name__}")
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        if tool.get("type", "function") != "function":
            raise ChatFormatError(f"{where}.type: expected 'function', found {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ChatFormatError(f"{where}.function: expected a dict with name/description/parameters")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ChatFormatError(f"{where}.function.name: expected an identifier, found {name!r}")
        where = f"tools[{i}] ({name})"
        if not isinstance(function.get("description", ""), str):
            raise ChatFormatError(f"{where}.description: expected str")
        params = function.get("parameters")
        if params is not None:
            _validate_schema(params, f"{where}.parameters")
            if str(params.get("type", "")).lower() != "object":
                raise ChatFormatError(f"{where}.parameters.type: expected 'object', found {params.get('type')!r}")
        out.append(dict(tool))
    return out


# ---------------------------------------------------------------------------------------------- rendering
def _plain(value: Any) -> Any:
    """Rebuild template data from plain JSON types; anything else becomes an inert placeholder string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())  # numpy scalar
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"  # media (PIL image, ndarray, path object): the template only tests presence


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template may not set underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_RENDER_CHARS = 16_000_000  # far beyond any context's worth of prompt text (128k tokens ~ 0.5 M characters)
RENDER_SECONDS = 10.0  # the Gemma 4 template renders a long conversation in milliseconds


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox raises at once on an unsafe attribute (``__class__``, ``__globals__``, ``mro`` ...): jinja2's
    default would return an undefined that prints as an empty string and only fails when used further. ``*`` and
    ``**`` are checked before they run (``'a' * 10**12`` or ``9 ** 999999`` would exhaust memory or time)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise jinja2.exceptions.SecurityError(
                        f"'*' would build a {type(seq).__name__} of {len(seq) * n} items (limit {MAX_RENDER_CHARS})")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1 and right * math.log2(abs(left)) > 65536:
            raise jinja2.exceptions.SecurityError(f"'**' would build an integer of over 65536 bits ({left} ** {right})")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe"
        )


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from e


class _Marked(str):
    """A user's text wrapped in two marker strings, so that the rendered prompt shows where it is (the processor
    tokenizes it as plain text). `strip` and its kin (the template's `trim`) act on the text inside the markers."""

    def __new__(cls, text: str, marks: tuple[str, str]):
        self = super().__new__(cls, marks[0] + text + marks[1])
        self._text, self._marks = text, marks
        return self

    def _wrap(self, text: str) -> "_Marked":
        return _Marked(text, self._marks)

    def strip(self, chars=None):
        return self._wrap(self._text.strip(chars))

    def lstrip(self, chars=None):
        return self._wrap(self._text.lstrip(chars))

    def rstrip(self, chars=None):
        return self._wrap(self._text.rstrip(chars))


USER_ROLES = ("user", "system", "developer")


def _mark_user_text(messages: list, marks: tuple[str, str]) -> list:
    """`messages` (already `_plain`) with the text of user, system and developer turns wrapped in `marks`."""
    out = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") in USER_ROLES:
            message = dict(message)
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = _Marked(content, marks)
            elif isinstance(content, list):
                message["content"] = [
                    {**item, "text": _Marked(item["text"], marks)}
                    if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)
                    else item for item in content]
        out.append(message)
    return out


def render(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    bos_token: str = "<bos>",
    special_tokens: Mapping[str, str] | None = None,
    mark_user_text: tuple[str, str] | None = None,
    max_chars: int = MAX_RENDER_CHARS,
    seconds: float = RENDER_SECONDS,
    **template_kwargs: Any,
) -> str:
    """Render a conversation with the checkpoint's chat template, as ``transformers``' ``apply_chat_template``.

    ``special_tokens`` is what the template may read besides ``bos_token`` (``Tokenizer.special_tokens_map``).
    The result starts with ``<bos>`` when the template emits one; tokenize it with ``Tokenizer.encode`` (which adds
    no second ``<bos>``). ``mark_user_text``: two marker strings placed around the text of every user, system and
    developer turn (the processor tokenizes what lies between them as plain text: a special token typed by a user
    stays text).
    """
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("chat template: expected a non-empty template string")
    validate_messages(messages)
    declared = validate_tools(tools) if tools else None
    variables: dict[str, Any] = {**(special_tokens or {}), "bos_token": bos_token}
    variables.update(template_kwargs)
    if enable_thinking:
        variables["enable_thinking"] = True
    compiled = _compile(template)
    context = dict(
        messages=_mark_user_text(_plain(list(messages)), mark_user_text) if mark_user_text else
        _plain(list(messages)),
        tools=_plain(declared),
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    try:
        with _time_limit(seconds):
            return _bounded(compiled.generate(**context), max_chars, seconds)
    except _RenderTimeout:
        raise ChatTemplateError(f"chat template: rendering took over {seconds:g} s (a template loops too long)") \
            from None
    except RecursionError:
        raise ChatTemplateError("chat template: rendering failed (recursion too deep: a macro calls itself without "
                                "end)") from None
    except MemoryError:
        raise ChatTemplateError("chat template: rendering failed (out of memory)") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template: refused by the sandbox ({e})") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: rendering failed ({type(e).__name__}: {e})") from e


class _RenderTimeout(Exception):
    pass


def _bounded(chunks, max_chars: int, seconds: float) -> str:
    """Join the rendered chunks, stopping at `max_chars` or `seconds` (checked between chunks)."""
    out, n, deadline = [], 0, time.monotonic() + seconds
    for chunk in chunks:
        n += len(chunk)
        if n > max_chars:
            raise ChatTemplateError(f"chat template: the rendered prompt is over {max_chars} characters")
        if time.monotonic() > deadline:
            raise _RenderTimeout
        out.append(chunk)
    return "".join(out)


class _time_limit:  # noqa: N801 - used as a context manager
    """SIGALRM after `seconds` in the main thread (elsewhere only `_bounded`'s checks between chunks apply)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                      and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0)

    def __enter__(self):
        if self.armed:
            def expire(signum, frame):
                raise _RenderTimeout
            self.previous = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            signal.signal(signal.SIGALRM, self.previous)


# ---------------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One function call the model asked for. ``arguments`` holds JSON values (dict/list/str/int/float/bool/None)."""

    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False, sort_keys=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Response:
    """The model's turn split into the visible answer, the thinking channel and the tool calls."""

    answer: str
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


class _ArgParser:
    """Recursive descent over Gemma's argument syntax: ``{key:value,...}``, ``[v,...]``, ``<|"|>str<|"|>``,
    ``true``/``false``/``null``, numbers; keys bare or ``<|"|>``-quoted."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, what: str) -> ToolCallParseError:
        near = self.s[max(0, self.i - 20) : self.i + 20]
        return ToolCallParseError(f"tool call arguments: {what} at offset {self.i} (near {near!r})")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def expect(self, token: str) -> None:
        self.ws()
        if not self.peek(token):
            raise self.error(f"expected {token!r}")
        self.i += len(token)

    def string(self) -> str:
        self.i += len(ESCAPE)
        end = self.s.find(ESCAPE, self.i)
        if end < 0:
            raise self.error("unterminated <|\"|> string")
        out = self.s[self.i : end]
        self.i = end + len(ESCAPE)
        return out

    def key(self) -> str:
        self.ws()
        if self.peek(ESCAPE):
            return self.string()
        if self.peek('"'):
            end = self.s.find('"', self.i + 1)
            if end < 0:
                raise self.error("unterminated key")
            out = self.s[self.i + 1 : end]
            self.i = end + 1
            return out
        m = re.compile(r"[^:{}\[\],\s]+").match(self.s, self.i)
        if not m:
            raise self.error("expected a key")
        self.i = m.end()
        return m.group(0)

    def obj(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        self.ws()
        if self.peek("}"):
            self.i += 1
            return out
        while True:
            k = self.key()
            self.expect(":")
            out[k] = self.value()
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("}")
            return out

    def array(self) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        self.ws()
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("]")
            return out

    def value(self) -> Any:
        self.ws()
        if self.peek(ESCAPE):
            return self.string()
        if self.peek("{"):
            return self.obj()
        if self.peek("["):
            return self.array()
        if self.peek('"'):  # a JSON string (the template passes string arguments through verbatim)
            try:
                val, end = json.JSONDecoder().raw_decode(self.s, self.i)
            except json.JSONDecodeError as e:
                raise self.error(f"bad JSON string ({e.msg})") from e
            self.i = end
            return val
        m = re.compile(r"[^,}\]]+").match(self.s, self.i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        word = m.group(0).strip()
        if word in ("true", "True"):
            return True
        if word in ("false", "False"):
            return False
        if word in ("null", "None"):
            return None
        try:
            number = float(word) if re.search(r"[.eE]", word) else int(word)
        except ValueError:
            return word  # a bare word the model did not quote: keep it as a string
        if isinstance(number, float) and not math.isfinite(number):
            return word
        return number


def parse_arguments(text: str) -> dict[str, Any]:
    """Parse a call's ``{key:value,...}`` payload (Gemma syntax, or plain JSON) into a dict."""
    parser = _ArgParser(text.strip())
    result = parser.obj()
    parser.ws()
    if parser.i != len(parser.s):
        raise parser.error("trailing text after the arguments")
    return result


_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)
_CALL_HEAD_RE = re.compile(r"\s*call:([^{\s]+)\s*(\{.*\})\s*\Z", re.DOTALL)
_CHANNEL_RE = re.compile(re.escape(CHANNEL_START) + r"(.*?)(?:" + re.escape(CHANNEL_END) + r"|\Z)", re.DOTALL)


def parse_tool_call(block: str) -> ToolCall:
    """Parse the inside of one ``<|tool_call>...<tool_call|>`` block (``call:NAME{...}``)."""
    m = _CALL_HEAD_RE.match(block)
    if not m:
        raise ToolCallParseError(f"tool call: expected 'call:NAME{{...}}', found {block[:80]!r}")
    return ToolCall(name=m.group(1), arguments=parse_arguments(m.group(2)))


def parse_response(text: str) -> Response:
    """Split the model's decoded turn (special tokens kept as text) into answer, thinking and tool calls.

    Thinking is every ``<|channel>...<channel|>`` block (an unterminated one runs to the end), without its
    ``thought\\n`` channel name; it is removed from the answer. Tool calls are parsed in order and removed from the
    answer. Text after ``<turn|>`` or ``<|tool_response>`` (both stop tokens) is dropped, as are ``<eos>``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_response expects str, got {type(text).__name__}")
    for stop in (TURN_END, TOOL_RESPONSE_START):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    text = text.replace("<eos>", "")
    thoughts = []
    for m in _CHANNEL_RE.finditer(text):
        body = m.group(1)
        if body.startswith("thought"):
            body = body[len("thought") :]
            body = body[1:] if body.startswith("\n") else body
        if body.strip():
            thoughts.append(body.strip())
    text = _CHANNEL_RE.sub("", text)
    calls = tuple(parse_tool_call(m.group(1)) for m in _CALL_RE.finditer(text))
    text = _CALL_RE.sub("", text)
    if TOOL_CALL_START in text:
        raise ToolCallParseError(f"tool call: {TOOL_CALL_START} without {TOOL_CALL_END} in {text[-80:]!r}")
    return Response(answer=text.strip(), thinking="\n".join(thoughts) if thoughts else None, tool_calls=calls)
