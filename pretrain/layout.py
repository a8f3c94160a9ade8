"""Names inside a run dir, shared by the trainer and the export without importing the trainer."""

CHECKPOINT_DIR = "checkpoints"
"""Complete checkpoints (pretrain.checkpoint)."""
MODEL_CONFIG_DIR = "model"
"""The transformers model config of the run (config.json)."""
SUMMARY_FILE = "summary.json"
"""Start / end validation perplexity, tokens, steps; written last, only when training finished."""
