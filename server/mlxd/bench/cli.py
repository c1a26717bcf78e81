"""The benchmark's command line: ``python -m mlxd.bench`` and ``mlxd bench``.

One command measures everything for one model directory::

    python -m mlxd.bench --model-dir DIR --spawn-mlx-lm --spawn-mlxd --quick

The in-process baseline runs first, then each target in the order given
(:mod:`mlxd.bench.session`). Results go to ``--out`` (``results.jsonl``, ``results.md``,
``plot.png``, ``meta.json``); see ``bench/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxd.bench.meta import collect_meta, default_out, read_model_summary
from mlxd.bench.report import BASELINE, plot, render_markdown, summarize, write_jsonl
from mlxd.bench.runner import ALL_SCENARIOS, FULL, QUICK, Plan, PromptBook
from mlxd.bench.session import Session, TargetSpec
from mlxd.bench.targets import BenchError
from mlxd.estimate.files import read_config

MLX_LM_COMMAND = "{python} -m mlx_lm.server --model {model_dir} --port {port}"
MLXD_COMMAND = "{python} -m mlxd serve --config {config} --port {port} --preload"


def _split_pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"expected NAME={what}, got {text!r}")
    return name.strip(), value.strip()


class _AddTarget(argparse.Action):
    """Append to one ordered list, whichever option names the target."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        specs: list[TargetSpec] = list(getattr(namespace, "targets", None) or [])
        try:
            if option_string == "--target":
                name, url = _split_pair(values, "URL")
                specs.append(TargetSpec(name, url=url))
            elif option_string == "--spawn":
                name, command = _split_pair(values, "CMD")
                specs.append(TargetSpec(name, command=command))
            elif option_string == "--spawn-mlx-lm":
                specs.append(TargetSpec("mlx_lm.server", command=MLX_LM_COMMAND))
            else:
                specs.append(TargetSpec("mlxd", command=values or MLXD_COMMAND))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        namespace.targets = specs


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or text!r}; known: {', '.join(ALL_SCENARIOS)}"
        )
    return names


def build_parser(prog: str = "python -m mlxd.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark OpenAI-compatible servers against the same model run in-process with "
            "mlx-lm, in one run, and report the ratios."
        ),
        epilog=(
            "Spawn command templates may use {python} (this interpreter), {model_dir}, "
            "{port} (a free port chosen for it; required) and {config} (a models.yaml serving "
            "just the model dir, written next to the results). Example: %(prog)s --model-dir "
            "~/models/qwen3-8b-4bit --spawn-mlx-lm --spawn-mlxd --quick"
        ),
    )
    p.add_argument("--model-dir", type=Path, required=True, help="mlx-lm model directory")
    p.add_argument(
        "--model-name",
        help="model id to send to every target (default: the id a target lists for the model dir)",
    )
    targets = p.add_argument_group("targets (measured one at a time, in the order given)")
    targets.add_argument(
        "--target",
        action=_AddTarget,
        metavar="NAME=URL",
        help="a running server, e.g. mlxd=http://127.0.0.1:8080/v1",
    )
    targets.add_argument(
        "--spawn",
        action=_AddTarget,
        metavar="NAME=CMD",
        help="start a server with CMD, measure it, stop it",
    )
    targets.add_argument(
        "--spawn-mlx-lm", action=_AddTarget, nargs=0, help=f"spawn: {MLX_LM_COMMAND}"
    )
    targets.add_argument(
        "--spawn-mlxd",
        action=_AddTarget,
        nargs="?",
        metavar="CMD",
        help=f"spawn (default: {MLXD_COMMAND})",
    )
    targets.add_argument(
        "--no-baseline", action="store_true", help="skip the in-process mlx-lm baseline"
    )
    size = p.add_argument_group("size of the run")
    size.add_argument(
        "--quick", action="store_true", help="a CI-sized run (minutes on a laptop CPU)"
    )
    size.add_argument(
        "--repeats",
        type=int,
        help="repeats of each single-request measurement (default 3, --quick 1)",
    )
    size.add_argument(
        "--group-repeats",
        type=int,
        help="repeats of the chat conversation and of each concurrent group (default 1)",
    )
    size.add_argument(
        "--scenarios", type=_scenario_list, help=f"subset of {','.join(ALL_SCENARIOS)}"
    )
    size.add_argument("--prompt-lengths", type=_int_list, help="prefill prompt lengths in tokens")
    size.add_argument(
        "--max-prompt",
        type=int,
        default=8192,
        help="drop prefill lengths above this (default 8192)",
    )
    size.add_argument("--decode-tokens", type=int, help="max_tokens of the decode scenario")
    size.add_argument("--chat-turns", type=int, help="turns of the accumulated chat")
    size.add_argument("--chat-user-tokens", type=int, help="tokens in each chat user message")
    size.add_argument("--concurrency", type=_int_list, help="concurrent stream counts, e.g. 1,4,8")
    size.add_argument("--concurrency-tokens", type=int, help="max_tokens of each concurrent stream")
    size.add_argument("--join-prompt", type=int, help="tokens of the prompt that joins (join)")
    size.add_argument("--join-streams", type=int, help="streams running when it joins (join)")
    size.add_argument("--join-tokens", type=int, help="max_tokens of those streams (join)")
    size.add_argument(
        "--suppress-eos",
        action="store_true",
        help="bias end-of-sequence tokens to -100 (logit_bias) so every request runs to max_tokens",
    )
    size.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the unrecorded round before each concurrent group and join (--quick skips it)",
    )
    p.add_argument(
        "--out", type=Path, help="results directory (default bench/results/DATE-MACHINE-MODEL)"
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per request (default 1800)"
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds for a spawned server to be ready",
    )
    p.add_argument("--no-plot", action="store_true", help="skip plot.png (no matplotlib needed)")
    return p


def make_plan(args: argparse.Namespace, context: int | None) -> Plan:
    """The plan the flags ask for, prefill lengths capped by the model context and --max-prompt."""
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"suppress_eos": args.suppress_eos}
    if args.no_warmup:
        changes["warmup"] = False
    for flag, name in (
        ("repeats", "repeats"),
        ("group_repeats", "group_repeats"),
        ("scenarios", "scenarios"),
        ("prompt_lengths", "prefill_lengths"),
        ("decode_tokens", "decode_max_tokens"),
        ("chat_turns", "chat_turns"),
        ("chat_user_tokens", "chat_user_tokens"),
        ("concurrency", "concurrency"),
        ("concurrency_tokens", "concurrency_max_tokens"),
        ("join_prompt", "join_prompt"),
        ("join_streams", "join_streams"),
        ("join_tokens", "join_max_tokens"),
    ):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    plan = dataclasses.replace(base, **changes)
    cap = args.max_prompt
    if context is not None:
        cap = min(cap, context - plan.prefill_max_tokens - 8)
    lengths = tuple(n for n in plan.prefill_lengths if n <= cap)
    if min(plan.repeats, plan.group_repeats) < 1:
        raise BenchError("--repeats and --group-repeats must be at least 1")
    return dataclasses.replace(plan, prefill_lengths=lengths)


def _check_names(specs: Sequence[TargetSpec], baseline: bool) -> None:
    names = [s.name for s in specs] + ([BASELINE] if baseline else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchError(f"target names must be unique: {', '.join(dupes)}")
    for spec in specs:
        if spec.command is not None and "{port}" not in spec.command:
            raise BenchError(f"spawn command for {spec.name} must contain {{port}}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from mlx_lm.utils import load_tokenizer

    specs: list[TargetSpec] = list(getattr(args, "targets", None) or [])
    baseline = not args.no_baseline
    _check_names(specs, baseline)
    if not specs and not baseline:
        raise BenchError("nothing to measure: give a --target/--spawn or keep the baseline")
    summary = read_model_summary(args.model_dir)
    plan = make_plan(args, summary.get("context"))
    meta = collect_meta(args, plan, argv)
    out = args.out or default_out(meta["machine"], summary["name"], args.quick)
    out.mkdir(parents=True, exist_ok=True)
    config = read_config(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir, eos_token_ids=config.get("eos_token_id"))
    session = Session(args, plan, PromptBook(tokenizer), out)
    session.say(f"model {summary['name']} on {meta['backend']}; results in {out}")
    names = ([BASELINE] if baseline else []) + [s.name for s in specs]
    try:
        if baseline:
            session.baseline()
        for spec in specs:
            session.server(spec)
    finally:
        metrics = summarize(session.records, session.memory, session.startup)
        meta["targets"] = {s.name: s.url or s.command for s in specs}
        write_jsonl(
            out / "results.jsonl", meta, session.records, session.memory, metrics, session.errors
        )
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        markdown = render_markdown(metrics, names, meta, session.errors)
        (out / "results.md").write_text(markdown)
        if not args.no_plot and metrics:
            if importlib.util.find_spec("matplotlib") is None:
                session.say("matplotlib is not installed: no plot.png (pip install matplotlib)")
            else:
                plot(metrics, names, out / "plot.png")
    print(markdown)
    session.say(
        f"wrote {out}/results.md, results.jsonl, meta.json" + ("" if args.no_plot else ", plot.png")
    )
    return 1 if session.errors else 0
