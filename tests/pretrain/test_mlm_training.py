"""Masked-LM pretraining end to end on 2 ranks: WordPiece tokenizer -> MLM-framed shards (one padded)
-> a weighted blend -> bert-test under ZeRO-2 -> verified export with fill-mask."""
import json
import os
import subprocess
import sys

from data_prep.prep import PrepConfig, prepare
from data_prep.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from tests.pretrain.conftest import TINY, Ranks, losses_by_step


def test_mlm_on_a_blend_of_two_datasets_learns_and_exports(tmp_path, corpus_dirs):
    tok = tmp_path / "wordpiece"
    train_tokenizer(TokenizerTrainConfig(inputs=corpus_dirs, output=str(tok), family="wordpiece", vocab_size=600,
                                         model_max_length=64))
    for name, inputs, tail in (("a", corpus_dirs[:2], "drop"), ("b", corpus_dirs[2:], "pad")):
        manifest = prepare(PrepConfig(inputs=inputs, tokenizer=str(tok), output=str(tmp_path / name), seq_len=64,
                                      objective="mlm", tail=tail, val_fraction=0.1, show_progress=False))
        assert manifest["objective"] == "mlm"
    config = tmp_path / "mlm.yaml"
    config.write_text(f"data:\n  tokenizer: {tok}\n  blend:\n    - {{path: {tmp_path / 'a'}, weight: 0.7}}\n"
                      f"    - {{path: {tmp_path / 'b'}, weight: 0.3}}\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [*TINY, f"run_dir={run_dir}", "model.preset=bert-test", "max_steps=30", "optim.lr=5e-3",
                 "deepspeed.micro_batch_size=4"]
    assert Ranks(config, 2, overrides, run_dir).wait() == [0, 0], (run_dir / "rank0.log").read_text()[-3000:]
    losses = losses_by_step(run_dir)
    assert sum(losses[s] for s in range(26, 31)) / 5 < sum(losses[s] for s in range(1, 6)) / 5 - 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss_end"] < summary["val_loss_start"] - 0.5
    out = subprocess.run([sys.executable, "-m", "lmforge", "export", str(run_dir), str(tmp_path / "hf")],
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
