"""data_prep: corpus reading, tokenizer training, tokenization and packing into Arrow shards.

Owns the on-disk shard format and its reader. Modules: :mod:`~data_prep.sources` (inputs and their
split into tasks), :mod:`~data_prep.reader` (blocks and records, shared with tokenizer training),
the tokenizer room :mod:`data_prep.tokenizer`, :mod:`~data_prep.encode` (tokenizing worker
processes), :mod:`~data_prep.dedup` (exact duplicates), :mod:`~data_prep.tokenizer.ids` (a tokenizer's ids
without transformers), :mod:`~data_prep.pack` (packing), :mod:`~data_prep.shards` (the on-disk format, its
writer and ``ShardReader``), :mod:`~data_prep.prep` (one prep task), :mod:`~data_prep.merge` (tasks
into one dataset), :mod:`~data_prep.stats`, :mod:`~data_prep.order` (seeded per-index permutations) and
:mod:`~data_prep.blend` (weighted blends of prepared datasets).

May import: ``lmforge_common`` and libraries. Never ``pretrain`` (it imports data_prep, not the other
way round), ``launch`` or ``lmforge`` (the CLI).
"""
