"""Counting a request's prompt tokens exactly as the engine will see them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.engine.client import chat_messages


class PromptCounter:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))

    def count(self, instruction: str, user_input: str) -> int:
        ids = self.tokenizer.apply_chat_template(
            chat_messages(instruction, user_input), add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        return len(ids)
