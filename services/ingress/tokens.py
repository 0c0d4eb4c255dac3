"""Counting a request's prompt tokens exactly as the engine will see them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.engine.base import Engine


class PromptCounter:
    def __init__(self, model_dir: Path, engine: Engine) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.engine = engine

    def count(self, instruction: str, user_input: str) -> int:
        # The engine's own chat turns, so ingress and engine agree on the prompt's length.
        ids = self.tokenizer.apply_chat_template(
            self.engine.chat_messages(instruction, user_input), add_generation_prompt=True,
            tokenize=True, return_dict=False,
        )
        return len(ids)
