"""The no-prep path: a raw corpus streamed with ``datasets``, split across 2 ranks, tokenized on the fly."""
import json

from tests.pretrain.conftest import TINY, Ranks


def test_raw_corpus_streams_into_two_ranks_and_trains(tmp_path, tokenizer_dir, corpus_dirs):
    config = tmp_path / "stream.yaml"
    config.write_text(f"seq_len: 64\ndata:\n  tokenizer: {tokenizer_dir}\n  raw_inputs: ['{corpus_dirs[0]}/*.py']\n"
                      "  raw_val_fraction: 0.3\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    codes = Ranks(config, 2, [*TINY, f"run_dir={run_dir}", "max_steps=12", "optim.lr=5e-3"], run_dir).wait()
    assert codes == [0, 0], (run_dir / "rank0.log").read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["val_loss_end"] < summary["val_loss_start"] - 0.3
    assert "streamed train sequences" in (run_dir / "rank0.log").read_text()
