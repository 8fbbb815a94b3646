"""Write a llama-architecture GGUF with random weights, big enough for GPU speed to mean something.

The default is about 1.1 billion parameters in F16 (2.2 GB): n_embd 2048, 16 layers, FFN 5632,
32 heads with 8 KV heads, a 32000-token vocabulary (the shape of TinyLlama 1.1B, with half its
layers). The weights are random, so the text is nonsense, but every matrix product, the KV cache
and the sampler do the same work as in a trained model of that shape: tokens per second are real.

The file is written by the test suite's ``write_tiny_gguf`` (tests/model_files.py), which takes
every dimension as an argument; this script only picks the dimensions and reports them.

    python contrib/gpu/make_model.py /tmp/model-f16.gguf
    python contrib/gpu/make_model.py /tmp/small.gguf --n-embd 256 --n-layer 2 --n-ff 256 \\
        --n-head 4 --n-head-kv 2 --vocab 1024          # a few MB, for a rehearsal on a laptop
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.model_files import tiny_gguf_parameters, write_tiny_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="The GGUF file to write.")
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=16)
    parser.add_argument("--n-ff", type=int, default=5632)
    parser.add_argument("--n-head", type=int, default=32)
    parser.add_argument("--n-head-kv", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=4096, help="The trained context length "
                        "the file declares (it caps Inferno's context_size).")
    parser.add_argument("--type", choices=("F16", "F32"), default="F16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dims = {"vocab_size": args.vocab, "n_embd": args.n_embd, "n_layer": args.n_layer,
            "n_head": args.n_head, "n_head_kv": args.n_head_kv, "n_ff": args.n_ff}
    started = time.perf_counter()
    args.path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_gguf(args.path, **dims, context_length=args.context, file_type=args.type,
                    seed=args.seed)
    report = {"path": str(args.path), "parameters": tiny_gguf_parameters(**dims),
              "bytes": args.path.stat().st_size, "type": args.type, "context": args.context,
              "seconds": round(time.perf_counter() - started, 1), **dims}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
