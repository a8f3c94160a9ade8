"""``lmforge eval``: lm-evaluation-harness on an exported folder, with a local task and nothing downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")  # the eval extra; make test installs it

TASKS = Path(__file__).resolve().parents[1] / "assets" / "lm_eval_tasks"
TASK = "lmforge_code_mc"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lmforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """A small Llama folder with its tokenizer, as an export lays it out (weights random but fixed)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("harness") / "hf"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def own_scores(folder: Path) -> tuple[float, float]:
    """(acc, acc_norm) of the local task computed here, by the harness's documented rule: the choice with the
    highest sum of continuation-token log-probabilities wins (acc_norm: divided by the choice's UTF-8 bytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = [json.loads(line) for line in (TASKS / "code_mc.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tok(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits.float(), -1)[0]
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(whole[len(context):])))
        norm = [s / len(c.encode()) for s, c in zip(scores, doc["choices"])]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["label"])
    return hits / len(docs), hits_norm / len(docs)


def test_eval_runs_a_local_task_offline_and_matches_a_direct_computation(causal_folder, tmp_path):
    out = tmp_path / "results.json"
    # from another directory: the task's relative data_files must resolve against the YAML's folder
    proc = lmforge("eval", str(causal_folder), "--tasks", TASK, "--include-path", str(TASKS), "--json", str(out),
                   "--batch-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    metrics = result["tasks"][TASK]
    assert result["samples"][TASK] == 12 and result["limit"] is None
    assert (metrics["acc"], metrics["acc_norm"]) == pytest.approx(own_scores(causal_folder), abs=1e-9)
    assert f"{TASK}: acc " in proc.stdout


def test_limit_scores_that_many_documents(causal_folder):
    from pretrain.export.harness import evaluate_folder

    result = evaluate_folder(causal_folder, [TASK], limit=3, include_path=TASKS, batch_size=4)
    assert result.samples == {TASK: 3} and result.limit == 3 and 0 <= result.tasks[TASK]["acc"] <= 1


def test_unknown_task_is_named(causal_folder, monkeypatch):
    """In-process: the unknown name is looked up in the whole registry (~20 s to index) before it is refused."""
    from pretrain.errors import ExportError
    from pretrain.export.harness import evaluate_folder

    with pytest.raises(ExportError, match=r"unknown lm-eval task\(s\) no_such_task \(registry \+ "):
        evaluate_folder(causal_folder, [TASK, "no_such_task"], include_path=TASKS)


def test_masked_lm_and_missing_folder_are_one_line_errors(causal_folder, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for args, expected in [((str(bert), "--tasks", TASK), "bert is a masked LM"),
                           ((str(tmp_path / "nope"), "--tasks", TASK), "not an exported model folder")]:
        proc = lmforge("eval", *args)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
