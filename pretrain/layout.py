"""Names inside a run dir, shared by the trainer and the export without importing the trainer."""

RUN_CONFIG_FILE = "config.yaml"
"""The resolved lmforge config of the run, rewritten at every start; as a config file it names its own folder
as ``run_dir`` (:func:`pretrain.config.is_run_config`)."""
DS_CONFIG_FILE = "ds_config.json"
"""The generated DeepSpeed config of the run."""
CHECKPOINT_DIR = "checkpoints"
"""Complete checkpoints (pretrain.checkpoint)."""
MODEL_CONFIG_DIR = "model"
"""The transformers model config of the run (config.json)."""
SUMMARY_FILE = "summary.json"
"""Start / end validation perplexity, tokens, steps; written last, only when training finished."""
