"""Which logits processors enforce a request's ``tool_choice`` and ``response_format``.

The grammar text comes from :mod:`mlxd.parsers.forcing` and the model's call format
(:mod:`mlxd.toolformats`); :class:`mlxd.grammar.GrammarProcessor` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlxd.grammar import GrammarProcessor, closing_ranks, compile_grammar
from mlxd.parsers.forcing import BanTokens, answer_grammar, calls_grammar, named_tool
from mlxd.protocol import ChatRequest, NamedToolChoice
from mlxd.toolformats import ToolCallFormat


def constraint_processors(
    tokenizer: Any,
    request: ChatRequest,
    tools: list[dict[str, Any]] | None,
    fmt: ToolCallFormat | None,
    *,
    starts_in_reasoning: bool,
    max_tokens: int,
) -> Callable[[], list[Any]]:
    """The logits processors that enforce ``tool_choice`` and ``response_format``, as a factory.

    `fmt` is the model's call format, given with `tools` (None without). The grammar is
    compiled (and checked: an unsupported schema is a 400) once, here; each call of the factory
    makes fresh per-sequence processors. A reasoning model whose prompt opened ``<think>``
    thinks unconstrained: the grammar starts after ``</think>``.
    """
    choice = request.tool_choice
    if tools and fmt is not None and choice == "none":
        start_ids = tokenizer.encode(fmt.open, add_special_tokens=False)
        ban = start_ids[:1] if len(start_ids) == 1 else []
        return (lambda: [BanTokens(ban)]) if ban else list
    parallel = request.parallel_tool_calls is not False
    think_end = tokenizer.think_end if starts_in_reasoning else None
    fmt_req = request.response_format
    structured = fmt_req is not None and fmt_req.type != "text"
    lark: str | None = None
    param = "tools"
    # JSON is wound up before the budget ends: answers, and calls whose body is JSON.
    budget = None if tools and fmt is not None and not fmt.json_body else max_tokens
    markers = (fmt.open, fmt.close) if fmt is not None else ()
    if tools and fmt is not None and (choice == "required" or isinstance(choice, NamedToolChoice)):
        chosen = named_tool(tools, choice.function["name"]) if isinstance(
            choice, NamedToolChoice
        ) else tools  # fmt: skip
        lark = calls_grammar(chosen, fmt, parallel=parallel, after_think=think_end is not None)
    elif structured:
        assert fmt_req is not None
        schema = fmt_req.schema_dict if fmt_req.type == "json_schema" else None
        param = "response_format.json_schema.schema" if schema is not None else "response_format"
        lark = answer_grammar(
            schema, tools=tools, fmt=fmt, parallel=parallel, after_think=think_end is not None
        )
    factories: list[Callable[[], Any]] = []
    if lark is not None:
        grammar = compile_grammar(tokenizer, lark, param, markers)
        factories.append(
            lambda: GrammarProcessor(tokenizer, grammar, trigger=think_end, budget=budget)
        )
    elif tools and fmt is not None:  # auto: a call, once opened, is finished validly
        grammar = compile_grammar(tokenizer, fmt.rest_of_call(tools), "tools", markers)
        trigger = fmt.open
        factories.append(
            lambda: GrammarProcessor(tokenizer, grammar, trigger, rearm=True, budget=budget)
        )
    if budget is not None and factories:
        closing_ranks(tokenizer)  # built once per tokenizer (a pass over the vocabulary), here
    return lambda: [make() for make in factories]
