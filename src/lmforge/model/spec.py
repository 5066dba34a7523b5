"""The model spec registry: one entry per architecture, and every place that builds or maps a model asks it.

A spec names the model class for a `model.arch`, how parallelism is applied to it from outside,
how it splits into pipeline stages, and how its state dict maps to Hugging Face and GGUF. Loading
(checkpoint.load_model), import, export and the trainer go through `spec_for(cfg)`, so a new family
is a new entry here and its own module, not new branches in each of them.

The functions live above this layer (parallelism in train/, writers in export/), so they are named
as "module:function" and imported only when asked for; imports keep going down the layers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.t5 import T5
from lmforge.model.transformer import Transformer


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    model: type[nn.Module]
    # parallelize(model, mesh, parallel: ParallelConfig, train: TrainConfig) -> model, in place
    parallelize: str
    # pipeline_split(model, stage, n_stages) -> the stage's module; "" means the family has none yet
    pipeline_split: str
    # hf_writer(cfg) -> (config.json dict, state-dict map); refuses variants transformers cannot load
    hf_writer: str
    # gguf_names(cfg) -> {our tensor name: GGUF name}; "" means llama.cpp has no graph we write for it
    gguf_names: str = ""
    config: type = ModelConfig

    def build(self, cfg: ModelConfig) -> nn.Module:
        return self.model(cfg)

    def fn(self, field: str) -> Callable[..., Any]:
        """The function a field names, imported now."""
        target = getattr(self, field)
        if not target:
            raise LmforgeError(f"model.arch={self.arch} has no {field.replace('_', ' ')}")
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)


SPECS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", Transformer, parallelize="lmforge.train.parallelize:parallelize_decoder",
                       pipeline_split="",
                       hf_writer="lmforge.export.hf:llama_writer", gguf_names="lmforge.export.gguf:tensor_names"),
    # GPT-2 is the same decoder with LayerNorm, learned positions and GELU; only its HF names differ.
    "gpt2": ModelSpec("gpt2", Transformer, parallelize="lmforge.train.parallelize:parallelize_decoder",
                      pipeline_split="",
                      hf_writer="lmforge.export.gpt2:gpt2_writer"),
    # Encoder-decoder: two stacks of blocks, data parallel only (no tensor / pipeline / context split).
    "t5": ModelSpec("t5", T5, parallelize="lmforge.train.parallelize:parallelize_t5", pipeline_split="",
                    hf_writer="lmforge.export.hf:t5_writer"),
}


def spec_for(cfg: ModelConfig) -> ModelSpec:
    if cfg.arch not in SPECS:
        raise LmforgeError(f"model.arch={cfg.arch}: no model spec for this architecture "
                           f"(available: {', '.join(SPECS)})")
    return SPECS[cfg.arch]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes (on the current default device: pass a meta device to skip init)."""
    return spec_for(cfg).build(cfg)
