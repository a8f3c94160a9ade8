"""data_prep: corpus reading, tokenizer training, tokenization and packing into Arrow shards.

data_prep owns the on-disk shard format (:mod:`data_prep.shards`) and its reader; ``pretrain``
imports it, never the other way round.
"""
