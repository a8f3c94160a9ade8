"""What the run records about its model object in ``RUN/model/`` (:data:`pretrain.layout.MODEL_CONFIG_DIR`),
at train time, where the model exists, so the export copies these files instead of working them out.

``config.json``                the model config, ``architectures`` naming the model's class
                               (``LlamaForCausalLM``, ``BertForMaskedLM``, ...), as ``model.save_pretrained`` writes it
``generation_config.json``     the model's generation config (``model.generation_config``; for a model that
                               cannot generate, ``GenerationConfig.from_model_config(model.config)``), its
                               ``pad_token_id`` falling back to ``eos_token_id``

Both are transformers' own serialisations (``to_json_string``), written atomically.
"""
from __future__ import annotations

import copy
from pathlib import Path

from lmforge_common import write_bytes_atomic

CONFIG_FILE = "config.json"
"""transformers' model config name (``transformers.utils.CONFIG_NAME``)."""
GENERATION_CONFIG_FILE = "generation_config.json"
"""transformers' generation config name (``transformers.utils.GENERATION_CONFIG_NAME``)."""


def write_model_files(model, model_dir: str | Path) -> None:
    """Write ``config.json`` (``architectures`` = ``[type(model).__name__]``) and ``generation_config.json``
    of ``model`` (a transformers ``PreTrainedModel``) into ``model_dir``, creating it.

    Call on one rank; the model is not changed (its config is copied before ``architectures`` is set).
    """
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    generation = getattr(model, "generation_config", None)  # None for a model that cannot generate
    if generation is None:
        generation = GenerationConfig.from_model_config(model.config)
    generation = copy.deepcopy(generation)
    if generation.pad_token_id is None:
        generation.pad_token_id = generation.eos_token_id
    write_bytes_atomic(model_dir / CONFIG_FILE, config.to_json_string().encode("utf-8"))
    write_bytes_atomic(model_dir / GENERATION_CONFIG_FILE, generation.to_json_string().encode("utf-8"))
