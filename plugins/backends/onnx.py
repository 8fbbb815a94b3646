"""The ``onnx`` backend: ONNX models on onnxruntime.

Enabled with ``[backends.onnx]``, whose settings are the defaults for every
ONNX model; a model's own options override them key by key::

    [backends.onnx]
    graph_optimization_level = "all"      # disable, basic, extended or all
    intra_op_threads = 0                  # 0: one per physical core
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    provider_options = { CUDAExecutionProvider = { device_id = 0 } }

The graph decides what a model can do: ``input_ids`` (with ``attention_mask``
and ``token_type_ids``) and token states or a sentence embedding make a text
encoder (``embed``), a ``logits`` output makes a classifier (``classify``),
and anything else is generic (``infer`` with tensors by input name). Every
model has ``infer``. Sessions run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferno.kernel import Backend, ConfigSpec, DriverContext, LoadedModel, ModelSpec, hookimpl
from inferno.plugins.backends.onnx_options import DEFAULTS, OnnxOptions, resolve_options, validators
from inferno.plugins.models.errors import ModelFileError

if TYPE_CHECKING:
    from inferno.plugins.backends.onnx_models import OnnxModel


class OnnxBackend(Backend):
    """Loads ``.onnx`` files into onnxruntime sessions."""

    formats = frozenset({"onnx"})

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        defaults = {key: list(value) if isinstance(value, list) else value
                    for key, value in DEFAULTS.items()}
        return ConfigSpec(defaults=defaults, validators=validators())

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self._models: weakref.WeakSet[OnnxModel] = weakref.WeakSet()

    async def load(self, spec: ModelSpec) -> LoadedModel:
        """Open ``spec`` in a session and wrap it as the kind of model its graph is."""
        options = resolve_options(spec.name, self.config, spec.options)
        started = time.perf_counter()
        optimized = self._optimized_path(spec, options)
        model = await asyncio.to_thread(self._build, spec, options, optimized)
        seconds = round(time.perf_counter() - started, 3)
        model.note(load_seconds=seconds)
        self._models.add(model)
        self.log.info("model loaded", model=spec.name, model_type=model.model_type,
                      providers=model.info["providers"], seconds=seconds)
        return model

    def _build(self, spec: ModelSpec, options: OnnxOptions, optimized: Path | None
               ) -> OnnxModel:
        # onnxruntime, numpy and tokenizers load here, not when the profile is read.
        from inferno.plugins.backends.onnx_models import OnnxModel
        from inferno.plugins.backends.onnx_session import open_session, tensors
        from inferno.plugins.backends.onnx_text import detect_model_type, open_text_model

        opset = self._opset(spec)
        session = open_session(spec.name, spec.path, options, optimized, self.log.warning)
        inputs, outputs = tensors(session.get_inputs()), tensors(session.get_outputs())
        providers = list(session.get_providers())
        threads = session.get_session_options().intra_op_num_threads
        info: dict[str, Any] = {
            "name": spec.name, "format": "onnx", "backend": self.name, "path": str(spec.path),
            "providers": providers, "device": providers[0].removesuffix("ExecutionProvider")
            .lower(), "inputs": inputs, "outputs": outputs, "opset": opset,
            "batch_size": options.batch_size, "max_batch_tokens": options.max_batch_tokens,
            "file_bytes": spec.path.stat().st_size,
            "graph_optimization_level": options.graph_optimization_level,
            "intra_op_threads": threads, "optimized_model": str(optimized or ""),
        }
        model_type = detect_model_type(inputs, outputs)
        if model_type == "generic":
            return OnnxModel(session, info)
        return open_text_model(model_type, session, info, options)

    @staticmethod
    def _opset(spec: ModelSpec) -> int | None:
        """The graph's opset, from the model manager's reading of the file; a model loaded
        without the manager is read the same way, which also turns away what is not ONNX."""
        if "opset" in spec.metadata:
            return spec.metadata["opset"]  # type: ignore[no-any-return]
        from inferno.plugins.models.formats import describe

        described = describe(spec.path)
        if described.format != "onnx":
            raise ModelFileError(spec.path, f"is a {described.format} file, not an ONNX model "
                                            f"(model {spec.name!r})")
        return described.metadata.get("opset")

    def _optimized_path(self, spec: ModelSpec, options: OnnxOptions) -> Path | None:
        if not options.optimized_model_dir:
            return None
        folder = self.context.data_dir / Path(options.optimized_model_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', spec.name)}.onnx"

    async def stop(self) -> None:
        """Close the models still open; the model manager normally closed them already."""
        for model in list(self._models):
            await model.close()
