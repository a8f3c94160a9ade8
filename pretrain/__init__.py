"""pretrain: stream prepared Arrow shards into a DeepSpeed ZeRO engine, train, evaluate, checkpoint, export."""
