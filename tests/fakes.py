"""Test doubles injected the way httpx injects a MockTransport: no patching.

``tiny_model_dir`` writes a model directory with a real (small, byte-level BPE) tokenizer and a
ChatML template, so the chat service renders and counts prompts exactly as it does for a real
model; ``FakeEngine`` stands in for the MLX engine and answers from a script.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxd.engine import GenerationChunk, GenerationRequest, LoadedModel

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model_dir(path: Path, context: int = 512, template: str = CHATML) -> Path:
    """A directory whose tokenizer loads with mlx_lm (no weights: the fake engine needs none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok.add_special_tokens([*specials, "<think>", "</think>", "<tool_call>", "</tool_call>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "chat_template": template,
            }
        )
    )
    vocab_size = tok.get_vocab_size()
    config = {
        "model_type": "llama", "max_position_embeddings": context, "vocab_size": vocab_size,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    # Weights that are only ever estimated (from the header), never loaded by the fake engine.
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {"model.embed_tokens.weight": mx.zeros((vocab_size, 16), dtype=mx.float16)},
    )
    return path


Responder = Callable[[GenerationRequest], list[str]]


@dataclass
class FakeEngine:
    """Answers with ``responder(request)``'s pieces, one piece per token.

    Records loads/unloads and the requests it saw; honours max_tokens and cancellation like the
    real engine, and can be told to fail a load or a generation.
    """

    responder: Responder = field(default=lambda req: ["Hello", " there", "!"])
    delay: float = 0.0
    events: list[str] = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    fail_load: set[str] = field(default_factory=set)
    fail_generate: bool = False
    loaded_path: Path | None = None
    on_piece: Callable[[int], None] | None = None  # called before piece i is produced

    async def load(self, path: Path, *, prewarm: bool = True) -> LoadedModel:
        await asyncio.sleep(0)
        if path.name in self.fail_load:
            from mlxd.errors import ModelLoadFailed

            raise ModelLoadFailed(f"cannot load {path}: corrupt")
        self.events.append(f"load:{path.name}")
        self.loaded_path = path
        return LoadedModel(path, {}, 0.0, 0, 0)

    async def unload(self) -> None:
        await asyncio.sleep(0)
        self.events.append(f"unload:{self.loaded_path.name if self.loaded_path else None}")
        self.loaded_path = None

    async def memory(self) -> dict[str, int]:
        return {"active": 0, "cache": 0, "peak": 0, "prefix_cache": 0}

    async def set_limits(self, memory_limit: int | None, wired_limit: int | None) -> None:
        self.events.append("limits")

    async def evict_prefix_cache(self, max_bytes: int) -> int:
        self.events.append(f"evict:{max_bytes}")
        return 0

    def stats(self) -> dict[str, int]:
        return {"generations": len(self.requests)}

    def close(self) -> None:
        self.events.append("close")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        model = self.loaded_path.name if self.loaded_path else "?"
        self.events.append(f"generate:{model}")
        if self.fail_generate:
            from mlxd.errors import EngineFailure

            raise EngineFailure("generation failed: boom")
        pieces = self.responder(request)
        n_prompt = len(request.prompt)
        count = 0
        try:
            for i, piece in enumerate(pieces):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if self.on_piece is not None:
                    self.on_piece(i)
                if request.cancel.is_set():
                    yield GenerationChunk("", None, request.cancel_reason, n_prompt, count)
                    return
                count += 1
                last = count == request.max_tokens
                final = "length" if last else ("stop" if i == len(pieces) - 1 else None)
                yield GenerationChunk(piece, i, final, n_prompt, count)
                if final:
                    return
            yield GenerationChunk("", None, "stop", n_prompt, count)
        finally:
            request.cancel.set()
            self.events.append(f"done:{model}")
