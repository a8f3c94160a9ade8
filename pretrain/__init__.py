"""pretrain: stream prepared Arrow shards into a DeepSpeed ZeRO engine, train, evaluate, checkpoint, export.

Owns the typed training config and its generated ds_config (:mod:`~pretrain.config`,
:mod:`~pretrain.engine`), distributed set-up in one place (:mod:`~pretrain.distributed`), models
(:mod:`~pretrain.model`, :mod:`~pretrain.loss`, :mod:`~pretrain.flops`), data streaming
(:mod:`~pretrain.data`, :mod:`~pretrain.sources`, :mod:`~pretrain.inputs`), the trainer and its
components (:mod:`~pretrain.trainer`, :mod:`~pretrain.checkpoint`, :mod:`~pretrain.guard`,
:mod:`~pretrain.preemption`, :mod:`~pretrain.metrics`), and the export room (:mod:`pretrain.export`).

May import: ``data_prep`` (the shard reader, the tokenizer folder, errors) and ``lmforge_common``.
Never ``launch`` (launchers start ranks; ranks do not call launchers) or ``lmforge`` (the CLI).
"""
