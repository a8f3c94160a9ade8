"""pretrain.export: a checkpoint into a verified Hugging Face folder (a room of pretrain).

Owns consolidation of ZeRO partitions (:mod:`~pretrain.export.consolidate`), the safetensors writer
(:mod:`~pretrain.export.safetensors_writer`), what a run recorded about itself
(:mod:`~pretrain.export.run_info`), verification in a fresh process (:mod:`~pretrain.export.verify`),
the model card (:mod:`~pretrain.export.model_card`), the Hub push (:mod:`~pretrain.export.hub`) and
the export command's core (:mod:`~pretrain.export.core`).

May import: ``pretrain`` (errors, layout, checkpoint, model), ``data_prep`` (tokenizer folder),
``lmforge_common``. Never ``launch`` or ``lmforge``. The trainer reaches the export only through
:func:`pretrain.export.core.spawn_export` (a separate process) and the probe of
:mod:`~pretrain.export.verify`.
"""
