"""Which execution provider Inferno's ONNX backend really used for a model, as JSON.

Loads MODEL through the profile's kernel and model manager (as `inferno embed` does), embeds one
sentence, and prints onnxruntime's version and available providers, the providers the model asked
for and the ones its session runs on (``info["providers"]``). A requested provider that this
onnxruntime lacks is skipped with a warning on stderr; the load fails only when none is left.

    python contrib/gpu/onnx_providers.py MODEL --config my.toml \\
        --set 'backends.onnx.providers=["CUDAExecutionProvider","CPUExecutionProvider"]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--profile", default="edge")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args(argv)

    import onnxruntime

    from inferno.kernel import InfernoError, Kernel

    async def work() -> dict[str, Any]:
        kernel = Kernel.from_profile(args.profile, config_file=args.config,
                                     sets=args.sets).configure()
        async with kernel.running(protocols=False):
            manager = kernel.service("models")
            started = time.perf_counter()
            async with manager.use(args.model) as loaded:
                vectors = await loaded.embed(["Inferno runs models on an NVIDIA machine."])
                info = dict(loaded.info)
            return {"model": args.model,
                    "requested": list(kernel.config["backends"]["onnx"]["providers"]),
                    "session_providers": info.get("providers"), "device": info.get("device"),
                    "embedding_length": len(vectors[0]),
                    "seconds": round(time.perf_counter() - started, 3)}

    result: dict[str, Any] = {"onnxruntime": onnxruntime.__version__,
                              "onnxruntime_device": onnxruntime.get_device(),
                              "available_providers": onnxruntime.get_available_providers()}
    try:
        result.update(asyncio.run(work()))
    except InfernoError as exc:
        result["error"] = str(exc)
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
