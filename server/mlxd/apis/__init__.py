"""The other APIs clients speak, each a translation onto the one chat service.

``anthropic`` (Messages), ``responses`` (OpenAI Responses), ``completions`` (OpenAI text
completions with fill-in-the-middle) and ``ollama``; ``common`` holds what they share.
"""

from __future__ import annotations

from fastapi import FastAPI

from mlxd.apis import anthropic, completions, ollama, responses


def install(app: FastAPI) -> None:
    """Register every API's routes (and the Responses store) on ``app``."""
    app.state.mlxd_responses = responses.ResponseStore()
    for module in (anthropic, responses, completions, ollama):
        app.include_router(module.router)
