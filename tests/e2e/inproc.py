"""An mlxd server running in this process (uvicorn on a loopback port, in a thread).

Used where a test must inject something into the real engine — e.g. a logits processor that
scripts the output of a random-weight model — while still going through real HTTP.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from mlxd.app import create_app
from mlxd.config import ModelsFile
from mlxd.engine import GenerationChunk, GenerationRequest, MLXEngine
from mlxd.localnet import free_port, wait_until_ready
from mlxd.settings import Settings
from tools.random_model import ScriptedLogits

Segment = str | int  # text to force, or a number of steps left to the model (and the server)


class Script(ScriptedLogits):
    """A test-only logits processor: forces texts and leaves gaps, segment by segment.

    ``["abc", 3, "def"]`` forces the tokens of "abc", lets 3 steps through untouched (e.g. a
    prefix the server itself forces), forces "def", then ``<|im_end|>``.
    """

    def __init__(self, segments: list[Segment], tokenizer: Any) -> None:
        plan: list[int | None] = []  # token to force at each step, None = free
        for seg in segments:
            if isinstance(seg, int):
                plan += [None] * seg
            else:
                plan += tokenizer.encode(seg, add_special_tokens=False)
        plan.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        super().__init__(plan)


class ScriptedEngine(MLXEngine):
    """The real MLX engine; each generation may be made to follow a :class:`Script`.

    ``scripts`` holds one segment list per request, consumed in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[list[Segment]] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.scripts:
            request.extra_processors.append(Script(self.scripts.pop(0), request.tokenizer))
        async for chunk in super().generate(request):
            yield chunk


@contextlib.contextmanager
def serve_in_thread(
    models: ModelsFile, home: Path, engine: MLXEngine, **settings: Any
) -> Iterator[str]:
    port = free_port()
    config = Settings(host="127.0.0.1", port=port, home=home, config_path=home / "models.yaml",
                      **settings)  # fmt: skip
    app = create_app(config, engine_factory=lambda _: engine, models=models)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{port}"
    wait_until_ready(
        f"{root}/health", 60, lambda: None if thread.is_alive() else "in-process mlxd stopped",
        interval=0.05,
    )  # fmt: skip
    try:
        yield f"{root}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
