"""``lmforge prep``, ``prep merge`` and ``prep stats`` through the command line."""
import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.cli_prep import slurm_array_task


def _errors(text):
    return [line for line in text.splitlines() if line.startswith("lmforge")]


def test_missing_input_exits_2_with_one_line_and_no_manifest(tmp_path, tokenizer_dir):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "prep", "--input", "no/such.jsonl", "--tokenizer", str(tokenizer_dir),
                           "--output", "out"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 2
    assert _errors(proc.stderr) == ["lmforge: error: no/such.jsonl: corpus input does not exist"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "manifest.json").exists()


def test_fatal_files_exit_2_naming_file_and_problem(tmp_path, tokenizer_dir, capsys):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "f.parquet")
    (tmp_path / "g.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    cases = [([str(tmp_path / "g.jsonl"), str(tmp_path / "f.parquet")], r"f.parquet: text column 'text' not found \(columns: body\)"),
             ([str(tmp_path / "t.jsonl.gz")], r"t.jsonl.gz: unreadable jsonl input \(EOFError")]
    for inputs, message in cases:
        out = tmp_path / "out"
        code = main(["prep", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output", str(out), "--workers", "1", "--no-progress"])
        (line,) = _errors(capsys.readouterr().err)
        assert code == 2 and line.startswith("lmforge: error: ")
        assert __import__("re").search(message, line), line
        assert not (out / "manifest.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["prep", "--input", "x.jsonl"])
    assert exc.value.code == 2
    assert "the following arguments are required: --tokenizer, --output" in capsys.readouterr().err


def test_slurm_array_tasks_then_merge_then_stats(tmp_path, tokenizer_dir, corpus_dirs, monkeypatch, capsys):
    assert slurm_array_task({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_STEP": "2",
                             "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert slurm_array_task({}) is None
    out = tmp_path / "data"
    args = ["prep", "--input", *corpus_dirs[:2], "--tokenizer", str(tokenizer_dir), "--output", str(out), "--seq-len", "64",
            "--val-fraction", "0.2", "--workers", "1", "--no-progress", "--no-merge"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    for array_index in ("5", "4"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", array_index)
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "task 1 of 2 done" in printed and "task 0 of 2 done" in printed
    assert not (out / "manifest.json").exists()
    assert main(["prep", "merge", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["num_tasks"] == 2 and manifest["counts"]["documents"] > 0
    assert main(["prep", "merge", str(out)]) == 0  # again: merging a merged folder gives the same manifest
    again = json.loads((out / "manifest.json").read_text())
    assert (again["counts"], again["splits"]) == (manifest["counts"], manifest["splits"])
    assert main(["prep", "stats", str(out), "--json", str(tmp_path / "stats.json")]) == 0
    table = capsys.readouterr().out
    assert "p50" in table and f"{manifest['splits']['train']['documents']:>12,}" in table
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert sum(s["documents"] for s in stats["splits"].values()) == manifest["counts"]["documents"]
    assert 0 < stats["splits"]["train"]["doc_tokens_p50"] <= stats["splits"]["train"]["doc_tokens_p99"]
    png = (out / "doc_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


HEAVY = ("torch", "transformers", "pandas", "datasets", "matplotlib", "deepspeed", "omegaconf", "pydantic", "tqdm",
         "pretrain", "launch")
"""Libraries and packages ``lmforge prep`` must not import for a ``tokenizers`` tokenizer (over a second of start-up
together; the training package and the launchers are not needed)."""
UNNEEDED_MODULES = ("lmforge.commands", "lmforge.cli_export", "lmforge.cli_launch", "lmforge.cli_tokenizer",
                    "lmforge.cli_checkpoint", "importlib.metadata", "numpy.ma", "concurrent.futures.process")
"""Modules a one-worker prep of a tiny input skips (issue 17's fixed cost): the other subcommands' parsers, the
installed-version lookup (lmforge_common.VERSION instead), numpy.ma (np.unique pulls it in) and the process pool."""


def test_prep_of_a_tokenizers_tokenizer_imports_neither_torch_nor_transformers(tmp_path, tokenizer_dir):
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(5)))
    code = ("import json, sys\nfrom lmforge.cli import main\n"
            f"rc = main(['prep', '--input', 'tiny.jsonl', '--tokenizer', {str(tokenizer_dir)!r}, '--output', 'out', "
            "'--seq-len', '32', '--no-progress'])\n"
            f"print(json.dumps([rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r})), "
            f"sorted(set(sys.modules) & set({list(UNNEEDED_MODULES)!r}))]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [0, [], []]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["documents"] == 5


def test_tokenizer_ids_read_without_transformers_equal_transformers_own(tokenizer_dir, family_dirs, tmp_path):
    import shutil

    from data_prep.tokenizer.folder import CONFIG_FILE, load_tokenizer_info
    from data_prep.tokenizer.ids import _fast_ids, tokenizer_info

    for folder in [tokenizer_dir, *family_dirs.values()]:
        assert _fast_ids(folder) is not None, folder  # the fast path, not the fallback, is what is compared
        assert tokenizer_info(folder) == load_tokenizer_info(folder), folder
    odd = tmp_path / "odd"  # a class transformers may give default tokens: the transformers path decides
    shutil.copytree(family_dirs["wordpiece"], odd)
    config = json.loads((odd / CONFIG_FILE).read_text())
    (odd / CONFIG_FILE).write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer", "pad_token": None}))
    assert _fast_ids(odd) is None and tokenizer_info(odd) == load_tokenizer_info(odd)


def test_stats_shows_a_blend_mixture_with_caps(tmp_path, prepared_dir, capsys):
    from data_prep.shards import ShardReader
    from lmforge.cli import main

    n = len(ShardReader(prepared_dir))
    cfg = tmp_path / "train.yaml"  # two copies of one dataset, the second capped at 1 epoch, 4 x its size planned
    cfg.write_text(f"max_steps: {n}\ndeepspeed: {{micro_batch_size: 2, gradient_accumulation_steps: 1}}\n"
                   f"data:\n  tokenizer: x\n  blend:\n    - {{path: {prepared_dir}, weight: 1}}\n"
                   f"    - {{path: {prepared_dir}, weight: 1, max_epochs: 1}}\n")
    assert main(["prep", "stats", "--blend", str(cfg), "--world-size", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"mixture over {4 * n:,} planned samples"
    capped = out[3].split()
    assert capped[3] == "1" and capped[4] == f"{n:,}" and capped[6] == "1.00" and capped[7] == "25.0%"
    assert out[2].split()[4] == f"{3 * n:,}" and out[2].split()[6] == "3.00"
