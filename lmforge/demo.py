"""``lmforge demo``: the whole pipeline on one machine.

1. tokenizer: byte-level BPE trained on the corpus          -> DIR/tokenizer
2. prep: tokenize, pack, write Arrow shards + manifest        -> DIR/data
3. train: DeepSpeed ZeRO-2 on ``nproc`` local ranks           -> DIR/run
4. export: consolidated Hugging Face folder with model card   -> DIR/hf
5. verify: the export reloads it in a fresh process, compares logits, generates -> DIR/verify.json
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from data_prep.prep import PrepConfig, prepare
from data_prep.tokenizer.train import train_byte_bpe
from launch.local import run_local
from pretrain.config import load_config, to_yaml
from pretrain.export.core import ExportOptions, export
from pretrain.trainer import CHECKPOINT_DIR, preflight, read_summary

log = logging.getLogger("lmforge.demo")


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    """Folder for every stage's output."""
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    """Corpus inputs; ``stdlib`` is the running interpreter's standard library (~31.5 MB)."""
    vocab_size: int = 8192
    """Tokenizer vocabulary, tokens."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation perplexity."""
    nproc: int = 2
    """Data-parallel ranks."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the training config (``pretrain/configs/demo.yaml``)."""


def demo_config_path() -> Path:
    return Path(str(resources.files("pretrain") / "configs" / "demo.yaml"))


def run_demo(cfg: DemoConfig) -> dict:
    """Run the five stages; returns the run summary joined with the verification result."""
    out = Path(cfg.output)
    tok_dir, data_dir, run_dir, hf_dir = out / "tokenizer", out / "data", out / "run", out / "hf"
    log.info("[1/5] tokenizer: byte-level BPE, vocab %d, on %s", cfg.vocab_size, " ".join(cfg.corpus))
    train_byte_bpe(cfg.corpus, tok_dir, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)
    log.info("[2/5] prep: seq_len %d -> %s", cfg.seq_len, data_dir)
    prepare(PrepConfig(inputs=cfg.corpus, tokenizer=str(tok_dir), output=str(data_dir), seq_len=cfg.seq_len,
                       val_fraction=cfg.val_fraction, overwrite=True))
    train_cfg = load_config(demo_config_path(), [f"run_dir={run_dir}", f"data.path={data_dir}",
                                                 f"data.tokenizer={tok_dir}", *cfg.overrides])
    preflight(train_cfg)  # refuse here, once, before any rank starts
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train.yaml"
    config_path.write_text(to_yaml(train_cfg))
    log.info("[3/5] train: %d ranks, ZeRO stage %d -> %s", cfg.nproc, train_cfg.deepspeed.zero_stage, run_dir)
    run_local([sys.executable, "-m", "lmforge", "train", str(config_path)], cfg.nproc)
    summary = read_summary(run_dir)
    log.info("[4/5] export -> %s, then [5/5] its verification in a fresh process", hf_dir)
    record = export(run_dir / CHECKPOINT_DIR / summary["checkpoint_tag"], hf_dir, ExportOptions(overwrite=True))
    verification = record["verification"]
    (out / "verify.json").write_text(json.dumps(verification, indent=2))
    log.info("[5/5] verified: logits within %.3g of the trained model's; generated %r -> %r",
             verification["max_abs_logit_diff"], verification["prompt"], verification["continuation"])
    result = {**summary, **verification}
    log.info("validation perplexity: %.2f at start -> %.2f at end (%d steps, %d tokens, %.0f tokens/s)",
             summary["val_ppl_start"], summary["val_ppl_end"], summary["steps"], summary["tokens"], summary["tokens_per_s"])
    return result
