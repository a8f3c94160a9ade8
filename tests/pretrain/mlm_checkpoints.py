"""Real masked-LM checkpoints for the export tests, built with lmforge's own DeepSpeed engine and save protocol.

The trainer does not train masked LMs yet (that needs masked-LM prepared data), so this script does
what its loop would: a ``bert-test`` model in :func:`pretrain.engine.initialize_engine`, a few
optimizer steps on randomly masked batches (15 % of tokens replaced by the mask token, loss on
those only), validation loss into ``metrics.jsonl``, and :func:`pretrain.checkpoint.save` with a
probe batch, in a run folder laid out as the trainer's. One process, one rank, a run per ZeRO stage.

``python -m tests.pretrain.mlm_checkpoints OUT TOKENIZER DATA STAGE:PRECISION [STAGE:PRECISION ...]``
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

MASK_FRACTION = 0.15
STEPS = 2


def _masked(ids: np.ndarray, mask_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen = rng.random(ids.shape) < MASK_FRACTION
    chosen[:, 0] = True  # at least one masked position per row
    inputs, labels = ids.copy(), np.full_like(ids, -100)
    labels[chosen], inputs[chosen] = ids[chosen], mask_id
    return inputs, labels


def _engine(out: Path, tokenizer: str, data: str, stage: int, precision: str):
    """``(cfg, run_dir, tokenizer info, mask id, train reader, val reader, engine)`` of one run folder, its
    config and model files written as the trainer writes them."""
    from transformers import AutoTokenizer

    from data_prep.shards import ShardReader
    from data_prep.tokenizer.folder import load_tokenizer_info
    from pretrain.config import load_config, to_yaml
    from pretrain.engine import initialize_engine
    from pretrain.model import build_model, build_model_config, padded_vocab_size
    from pretrain.model_files import write_model_files

    run_dir = out / f"mlm-zero{stage}-{precision}"
    cfg = load_config(None, [f"run_dir={run_dir}", f"data.path={data}", f"data.tokenizer={tokenizer}",
                             "model.preset=bert-test", f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                             "deepspeed.micro_batch_size=4", f"max_steps={STEPS}", "optim.warmup_steps=1", "optim.lr=3e-3"])
    tok = load_tokenizer_info(tokenizer)
    mask_id = AutoTokenizer.from_pretrained(tokenizer).mask_token_id
    train, val = ShardReader(data, "train"), ShardReader(data, "val")
    model_config = build_model_config("bert-test", padded_vocab_size(tok.vocab_size), train.seq_len,
                                      {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                                       "pad_token_id": tok.pad_token_id})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    model = build_model(model_config, cfg.seed)
    write_model_files(model, run_dir / "model")  # what the trainer records
    return cfg, run_dir, tok, mask_id, train, val, initialize_engine(model, cfg, 1)


def build(out: Path, tokenizer: str, data: str, stage: int, precision: str) -> Path:
    import torch

    from data_prep.shards import MANIFEST_NAME, sha256_file
    from pretrain import checkpoint
    from pretrain.config import to_yaml
    from pretrain.export.verify import probe_metadata
    from pretrain.flops import device_description
    from pretrain.metrics import MetricsWriter

    cfg, run_dir, tok, mask_id, train, val, engine = _engine(out, tokenizer, data, stage, precision)
    metrics = MetricsWriter(run_dir, True)

    def loss_on(ids: np.ndarray, seed: int):
        inputs, labels = _masked(ids, mask_id, seed)
        return engine(input_ids=torch.from_numpy(inputs), labels=torch.from_numpy(labels)).loss

    def evaluate(step: int) -> dict:
        engine.eval()
        with torch.no_grad():
            loss = loss_on(val.batch(np.arange(4)), 999).float().item()
        engine.train()
        rec = {"step": step, "val_loss": loss, "val_ppl": math.exp(loss)}
        metrics.write(rec)
        return rec

    val_start = evaluate(0)
    for step in range(1, STEPS + 1):
        loss = loss_on(train.batch(np.arange(4 * step - 4, 4 * step)), step)
        engine.backward(loss)
        engine.step()
        metrics.write({"step": step, "loss": loss.float().item(), "lr": engine.get_lr()[0], "tokens": step * 4 * train.seq_len,
                       "tokens_per_s": 1000.0, "consumed_samples": 4 * step})
    evaluate(STEPS)

    def probe():
        ids = torch.from_numpy(_masked(val.batch(np.arange(2)), mask_id, 7)[0])
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids).logits.float()
        engine.train()
        return {"tensors": {"input_ids": ids, "logits": logits}, "metadata": probe_metadata(precision, "cpu")}

    state = checkpoint.TrainState(step=STEPS, consumed_samples=4 * STEPS, tokens=4 * STEPS * train.seq_len)
    fingerprints = {"tokenizer": tok.fingerprint, "manifest": sha256_file(Path(data) / MANIFEST_NAME)}
    path = checkpoint.save(engine, run_dir / "checkpoints", state, 0,
                           {"world_size": 1, "fingerprints": fingerprints, "config_yaml": to_yaml(cfg),
                            "hardware": f"1 x {device_description()}", "val_start": val_start}, probe_fn=probe)
    metrics.close()
    return path


def main(argv: list[str]) -> None:
    from lmforge.cli import leave
    from pretrain.distributed import destroy_distributed, init_distributed

    out, tokenizer, data, *variants = argv
    init_distributed()
    try:
        for variant in variants:  # ZeRO-3 last: it wraps modules for the rest of the process
            stage, precision = variant.split(":")
            print(build(Path(out), tokenizer, data, int(stage), precision), flush=True)
    finally:
        destroy_distributed()
    leave(0)  # as a train process does: gloo's threads could abort the interpreter's finalization


if __name__ == "__main__":
    main(sys.argv[1:])
