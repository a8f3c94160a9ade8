"""``config.json`` and ``generation_config.json`` of an export, written without importing transformers.

transformers is the authority on both files, but importing it costs about 0.7 s (``GenerationConfig``)
and, for the architecture's class name, 2 s more (``modeling_auto`` imports torch), a third of an
export of a 1 GB model. So the class name is read from the source of transformers' own mapping
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` / ``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` in
``transformers/models/auto/modeling_auto.py``, a literal) and ``generation_config.json`` holds what
``GenerationConfig(...).save_pretrained`` writes for three token ids. Tests compare both with the
imported library.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path

from pretrain.errors import ExportError

log = logging.getLogger(__name__)

MAPPINGS = {"clm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "mlm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES"}
"""Objective -> the transformers mapping from model_type to the class name of that head."""
GENERATION_CONFIG_FILE = "generation_config.json"


@lru_cache(maxsize=None)
def _mapping_from_source(name: str) -> dict[str, str] | None:
    """The literal ``NAME = OrderedDict([...])`` of transformers' modeling_auto.py, or None when the
    source is not found or the assignment is not a literal any more."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]
                    and isinstance(node.value, ast.Call) and len(node.value.args) == 1):
                return dict(ast.literal_eval(node.value.args[0]))
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        log.debug("%s: cannot read %s from the source (%s); importing it", path, name, exc)
    return None


def architecture(model_type: str, objective: str) -> str:
    """transformers' class name for ``model_type`` with a causal-LM (``clm``) or masked-LM (``mlm``) head,
    e.g. ``LlamaForCausalLM``, as ``config.json``'s ``architectures`` names it.

    Raises:
        ExportError: transformers has no such class.
    """
    names = _mapping_from_source(MAPPINGS[objective])
    if names is None:
        from transformers.models.auto import modeling_auto

        names = getattr(modeling_auto, MAPPINGS[objective])
    if model_type not in names:
        raise ExportError(f"model_type {model_type!r} has no transformers {objective.upper()} class")
    return names[model_type]


def generation_config(bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    """What ``GenerationConfig(bos_token_id=..., eos_token_id=..., pad_token_id=...).save_pretrained``
    writes: the ids that are set (its other fields stay at their defaults, which it leaves out) and the
    transformers version."""
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return {**{k: v for k, v in ids.items() if v is not None},
            "transformers_version": importlib.metadata.version("transformers")}


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as transformers writes its config files: indented by 2, keys sorted, a final newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
