"""Commands that work on model files and speed: ``inferno convert`` and ``inferno bench``."""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from inferno.kernel import Backend, GenerationRequest, InfernoError, LoadedModel, ModelSpec
from inferno.kernel.cli import global_options

from .cli import with_models
from .convert import quantize_gguf, quantize_onnx
from .errors import ModelError
from .formats import describe
from .manager import ModelManager
from .registry import Entry

# --------------------------------------------------------------------------- convert


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quantize", "quantization", required=True, metavar="TYPE",
              help="GGUF: a llama.cpp type such as Q4_K_M, Q8_0 or F16. ONNX: int8.")
@click.option("--optimize", is_flag=True, help="ONNX: optimise the graph before quantising.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--requantize", is_flag=True, help="GGUF: allow a source that is already "
                                                 "quantised (loses more quality).")
@global_options
def convert(src: Path, dst: Path, quantization: str, *, optimize: bool, overwrite: bool,
            requantize: bool) -> None:
    """Quantise SRC into DST, then load DST and run one request to prove it works.

    SRC is never changed; DST appears only when the conversion succeeded.
    """
    def progress(line: str) -> None:
        click.echo(line, err=True)

    try:
        format_ = describe(src).format
        if format_ == "gguf":
            quantize_gguf(src, dst, quantization, progress=progress, overwrite=overwrite,
                          allow_requantize=requantize)
        elif format_ == "onnx":
            if quantization.lower() not in ("int8", "qint8"):
                raise ModelError(src, f"ONNX models quantise to int8 only, not {quantization!r}")
            quantize_onnx(src, dst, optimize=optimize, progress=progress, overwrite=overwrite)
        else:
            raise ModelError(src, f"cannot convert {format_} files (GGUF and ONNX only)")
    except InfernoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)

    async def check(manager: ModelManager) -> str:
        return await validate(manager, dst)

    click.echo(f"validated {dst}: {with_models(check)}")


async def validate(manager: ModelManager, path: Path) -> str:
    """Load ``path`` with the backend for its format and run one small request."""
    described = describe(path)
    entry = Entry(name="converted", path=path, source="inferno convert")
    backend: Backend = manager.backend_for(entry, described.format)
    spec = ModelSpec("converted", path, described.format, {}, described.metadata)
    model = await backend.load(spec)
    try:
        return await _one_request(model)
    finally:
        await model.close()


async def _one_request(model: LoadedModel) -> str:
    kind = model.info.get("model_type")
    if kind == "text-encoder":
        vectors = await model.embed(["hello"])
        return f"an embedding of {len(vectors[0])} dimensions"
    if kind == "classifier":
        labels = await model.classify(["hello"])  # type: ignore[attr-defined]
        return f"classified as {labels[0][0]['label']}"
    if kind == "generic":
        outputs = await model.infer(_zeros(model.info["inputs"]))  # type: ignore[attr-defined]
        return f"outputs {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())}"
    request = GenerationRequest(uuid.uuid4().hex, prompt="Hello",
                                params={"max_tokens": 8, "temperature": 0.0})
    text = "".join([chunk.text async for chunk in model.generate(request)])
    return f"generated {text!r}"


def _zeros(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    feeds = {}
    for tensor in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensor["shape"] or []]
        dtype = str(tensor["type"]).removeprefix("tensor(").removesuffix(")")
        feeds[tensor["name"]] = np.zeros(shape, dtype={"float": "float32",
                                                       "double": "float64"}.get(dtype, dtype))
    return feeds


# --------------------------------------------------------------------------- bench


@click.command()
@click.argument("model")
@click.option("--prompt-tokens", default=128, show_default=True,
              help="About this many prompt tokens per run.")
@click.option("--tokens", default=64, show_default=True, help="Tokens to decode per run.")
@click.option("--runs", default=3, show_default=True, help="Runs after one warm-up; the "
                                                           "median is reported.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@global_options
def bench(model: str, prompt_tokens: int, tokens: int, runs: int, *, as_json: bool) -> None:
    """Measure MODEL: load time, prompt and decode tokens/s, time to first token.

    Embedding models report inputs per second at batch 1 and batch 32 instead.
    """

    async def work(manager: ModelManager) -> dict[str, Any]:
        await manager.unload(model, "requested")
        started = time.perf_counter()
        await manager.load(model)
        result: dict[str, Any] = {"model": manager.entry(model).name,
                                  "load_seconds": round(time.perf_counter() - started, 3)}
        async with manager.use(model) as loaded:
            result["info"] = {k: v for k, v in loaded.info.items()
                              if isinstance(v, str | int | float | bool | type(None))}
            if loaded.info.get("model_type") in ("text-encoder", "classifier"):
                result.update(await _bench_embeddings(loaded, runs))
            else:
                result.update(await _bench_generation(loaded, prompt_tokens, tokens, runs))
        return result

    result = with_models(work)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key != "info":
            click.echo(f"{key:<26} {value}")


async def _bench_generation(model: LoadedModel, prompt_tokens: int, tokens: int, runs: int
                            ) -> dict[str, Any]:
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * max(prompt_tokens // 10,
                                                                           1))
    samples: list[dict[str, Any]] = []
    for run in range(runs + 1):
        # A different first word per run defeats the prompt cache, so prompts are evaluated.
        request = GenerationRequest(uuid.uuid4().hex, prompt=f"Run {run}. {prompt}",
                                    params={"max_tokens": tokens, "temperature": 0.0})
        async for chunk in model.generate(request):
            if chunk.finish_reason and run:  # the first run warms up
                samples.append(dict(chunk.usage or {}))

    def median(key: str) -> float:
        return round(statistics.median(float(s[key] or 0) for s in samples), 4)

    return {"prompt_tokens": samples[0]["prompt_tokens"],
            "completion_tokens": samples[0]["completion_tokens"],
            "time_to_first_token_s": median("time_to_first_token"),
            "prompt_tokens_per_second": median("prompt_tokens_per_second"),
            "decode_tokens_per_second": median("decode_tokens_per_second"), "runs": runs}


async def _bench_embeddings(model: LoadedModel, runs: int) -> dict[str, Any]:
    sentences = [f"Sentence number {i} is about models, speed and the weather."
                 for i in range(64)]
    result: dict[str, Any] = {}
    for batch in (1, 32):
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            for at in range(0, 64, batch):
                await model.embed(sentences[at:at + batch])
            rates.append(64 / (time.perf_counter() - started))
        result[f"inputs_per_second_batch_{batch}"] = round(statistics.median(rates), 1)
    return result


COMMANDS: list[click.Command] = [convert, bench]
