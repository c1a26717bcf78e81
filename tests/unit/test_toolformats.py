"""The tool-call format registry: lookup, the models.yaml key, the template probe, and every
registered format writing a call its own grammar forces and its own parser reads back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mlx_lm.utils import load_tokenizer

from mlxd import toolformats
from mlxd.config import ConfigError, parse_models
from mlxd.grammar import GrammarProcessor, compile_grammar
from mlxd.parsers.forcing import calls_grammar
from mlxd.toolformats.hermes import HERMES
from mlxd.toolformats.qwen_xml import QWEN_XML
from tests.unit.test_forcing import UNIT, generate, tokenizer
from tools.random_model import build_qwen_tokenizer, write_chat_template


class Rendering:
    """A tokenizer stand-in whose chat template renders `text` (or fails)."""

    def __init__(self, text: str | None) -> None:
        self.text = text

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.text is None:
            raise ValueError("this template cannot render tool calls")
        return self.text


def test_lookup_by_name() -> None:
    assert toolformats.names()[:2] == ["hermes", "qwen_xml"]
    assert toolformats.get("hermes") is HERMES
    assert toolformats.get("qwen_xml") is QWEN_XML


def test_an_unknown_name_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown tool-call format 'mistral' \(known: 'hermes'"):
        toolformats.get("mistral")
    with pytest.raises(ValueError, match="registered twice"):
        toolformats.register(HERMES)


def test_models_yaml_names_a_format_by_a_checked_key() -> None:
    model = {"id": "m", "source": {"path": "/x"}}
    models = parse_models({"models": [{**model, "tool_call_format": "qwen_xml"}]}, "models.yaml")
    assert models.models[0].tool_call_format == "qwen_xml"
    assert parse_models({"models": [model]}, "models.yaml").models[0].tool_call_format is None
    with pytest.raises(ConfigError, match=r"models\[0\] \(id 'm'\)\.tool_call_format: .*'nope'"):
        parse_models({"models": [{**model, "tool_call_format": "nope"}]}, "models.yaml")


@pytest.mark.parametrize(
    ("rendered", "expected"),
    [
        ('<tool_call>\n{"name": "mlxd_probe", "arguments": {"a": 1}}\n</tool_call>', HERMES),
        ("<tool_call>\n<function=mlxd_probe>\n<parameter=a>\n1\n</parameter>\n", QWEN_XML),
        ("<|im_start|>user\nx<|im_end|>\n", HERMES),  # the template drops calls: the fallback
        (None, HERMES),  # the template fails on calls: the fallback
    ],
    ids=["json", "xml", "dropped", "fails"],
)
def test_the_probe_picks_the_form_the_template_renders(
    rendered: str | None, expected: toolformats.ToolCallFormat
) -> None:
    assert toolformats.probe(Rendering(rendered)) is expected
    assert toolformats.format_for(Rendering(rendered), None) is expected


def test_models_yaml_wins_over_the_probe() -> None:
    xml = Rendering("<function=mlxd_probe>")
    assert toolformats.format_for(xml, "hermes") is HERMES


def test_the_probe_through_mlxd_templates(tmp_path: Path) -> None:
    """mlxd's Qwen template writes JSON calls; with Qwen3.5/3.6's settings, XML ones."""
    assert toolformats.probe(tokenizer("qwen3")) is HERMES
    build_qwen_tokenizer(tmp_path, "qwen3_6")
    write_chat_template(tmp_path, think_in_prompt=True)
    assert toolformats.probe(load_tokenizer(tmp_path)) is QWEN_XML


@pytest.mark.parametrize("name", toolformats.names())
def test_each_format_round_trips_a_call_through_its_grammar_and_parser(name: str) -> None:
    """Random weights forced by the format's grammar write a call its parser reads back."""
    fmt = toolformats.get(name)
    tok = tokenizer("qwen3")
    lark = calls_grammar([UNIT], fmt, parallel=False)
    grammar = compile_grammar(tok, lark, "tools", (fmt.open, fmt.close))
    processor = GrammarProcessor(tok, grammar, budget=80)
    text = generate("qwen3", "<|im_start|>assistant\n", [processor], 80)
    assert processor.failed is None and text.startswith(fmt.open)
    parser = fmt.parser([UNIT])
    first, last = parser.feed(text), parser.finish()
    deltas = first.calls + last.calls
    assert parser.call_count == 1 and not parser.truncated
    assert [d.name for d in deltas if d.name] == ["set_unit"]
    arguments = json.loads("".join(d.arguments for d in deltas))
    jsonschema.validate(arguments, UNIT["function"]["parameters"])
