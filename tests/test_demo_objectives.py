"""``lmforge demo`` for the other objectives at tiny scale, and the ModernBERT recipe config.

Each demo runs once per module (a fixture): WordPiece -> MLM shards -> a 2-layer ModernBERT on 2 ranks -> a
verified export answering fill-mask; byte-level BPE with FIM sentinels -> FIM shards -> llama-test -> an export
that infills and whose card shows how.
"""
import json

import pytest

from lmforge.demo import FILL_MASK_SENTENCE, DemoConfig, DemoError, _show_fill_mask, config_path, demo_precision, run_demo
from pretrain.config import load_config

TINY = ["max_steps=8", "log_every_steps=4", "optim.warmup_steps=2", "deepspeed.micro_batch_size=4",
        "data.eval_batches=2", "show_progress=false"]


def test_modernbert_recipe_config_loads_with_the_papers_masking():
    cfg = load_config(config_path("modernbert.yaml"), ["data.path=x", "data.tokenizer=y"])
    assert (cfg.mlm.probability, cfg.mlm.eval_probability) == (0.3, 0.15)
    assert cfg.data.document_masking and cfg.model.preset == "modernbert-base" and cfg.seq_len == 1024
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.betas) == (8e-4, "wsd", [0.9, 0.98])


def test_fim_does_not_go_with_mlm(tmp_path):
    with pytest.raises(DemoError, match="--fim"):
        run_demo(DemoConfig(output=str(tmp_path), objective="mlm", fim=True))
    assert not any(tmp_path.iterdir())  # refused before any stage wrote anything


@pytest.fixture(scope="module")
def mlm_demo(tmp_path_factory):
    """The masked demo on its default corpus (Python's help topics and stdlib docstrings), 2 ModernBERT layers."""
    out = tmp_path_factory.mktemp("mlm-demo")
    small = ["model.overrides.num_hidden_layers=2", "model.overrides.hidden_size=64", "model.overrides.intermediate_size=96",
             "model.overrides.local_attention=16"]
    return out, run_demo(DemoConfig(output=str(out), objective="mlm", vocab_size=1000, seq_len=64, nproc=2,
                                    overrides=[*small, *TINY]))


def test_mlm_demo_trains_the_modernbert_recipe_and_its_export_fills_the_mask(mlm_demo, capsys):
    out, result = mlm_demo
    assert (out / "corpus" / "prose.jsonl").stat().st_size > 1_000_000  # the prose that ships with Python
    train = load_config(out / "train.yaml")
    assert (train.model.preset, train.mlm.probability, train.mlm.eval_probability) == ("modernbert-base", 0.3, 0.15)
    assert train.model.overrides["num_hidden_layers"] == 2 and train.deepspeed.precision == demo_precision()
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"] and config["num_hidden_layers"] == 2
    verify = json.loads((out / "verify.json").read_text())
    assert verify["pipeline"] == "fill-mask" and verify["exact"] and verify["max_abs_logit_diff"] == 0
    assert result["fill_mask_sentence"] == FILL_MASK_SENTENCE.format(mask="[MASK]")
    answers = result["fill_mask_demo"]
    assert len(answers) == 5 and all(0 < a["score"] <= 1 and a["token_str"] for a in answers)
    assert sum(a["score"] for a in answers) <= 1 + 1e-6
    assert result["val_loss_end"] < result["val_loss_start"]
    card = (out / "hf" / "README.md").read_text()  # issue 16: a masked LM's card leaves bits per byte out, saying why
    assert "No bits per byte for a masked LM: its loss covers only the masked tokens" in card
    assert "bits per byte |" not in card and "val_bpb_end" not in json.loads((out / "run" / "summary.json").read_text())
    _show_fill_mask(out / "hf")  # what the demo printed at its end, printed again from the export
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"fill-mask: {result['fill_mask_sentence']}" and len(printed) == 6
    assert printed[1:] == [f"  {a['token_str']!r:>14}  {a['score']:.3f}" for a in answers]  # repr: "'" stays visible


@pytest.fixture(scope="module")
def fim_demo(tmp_path_factory, corpus_dirs):
    out = tmp_path_factory.mktemp("fim-demo")
    return out, run_demo(DemoConfig(output=str(out), corpus=corpus_dirs, fim=True, vocab_size=600, seq_len=64,
                                    val_fraction=0.1, nproc=2, overrides=["model.preset=llama-test", *TINY]))


def test_fim_demo_infills_through_the_export_and_its_card_shows_how(fim_demo):
    from data_prep.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
    from lmforge.demo import FIM_EXAMPLE, infill

    out, result = fim_demo
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert '"fim_rate": 0.5' in json.dumps(manifest)
    assert (result["infill"]["prefix"], result["infill"]["suffix"]) == FIM_EXAMPLE
    middle = result["infill"]["middle"]  # 8 steps of llama-test: whitespace and punctuation, but generated, not EOS at once
    assert isinstance(middle, str) and middle != "", result["infill"]
    assert infill(out / "hf", *FIM_EXAMPLE) == result["infill"]["middle"]  # greedy: the same middle again
    card = (out / "hf" / "README.md").read_text()
    assert f"{FIM_PREFIX}def is_even(n):" in card and FIM_SUFFIX in card and FIM_MIDDLE in card
    assert "model.generate(**inputs" in card and "add_special_tokens=False" in card


def test_infill_refuses_a_tokenizer_without_the_sentinels(mlm_demo):
    out, _ = mlm_demo
    with pytest.raises(DemoError, match="<fim_prefix>"):
        from lmforge.demo import infill

        infill(out / "hf", "a", "b")


def test_cli_refuses_fim_with_mlm_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmforge", "demo", "--objective", "mlm", "--fim", "--output", "out"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("lmforge")] == [
        "lmforge: error: demo --fim trains a causal LM; it does not go with --objective mlm"]
