"""Bad input through the real command line: one line on stderr, exit 2, nothing that looks complete."""
import os
import subprocess
import sys


def _lmforge(*args, cwd):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, env=env)


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("lmforge")]


def test_missing_corpus_path(tmp_path):
    proc = _lmforge("demo", "--output", "out", "--corpus", "no/such/corpus.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert _error_lines(proc) == ["lmforge: error: no/such/corpus.jsonl: corpus input does not exist"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    proc = _lmforge("demo", "--output", "out", "--corpus", "empty.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert _error_lines(proc) == ["lmforge: error: empty.jsonl: empty corpus, no usable document (1 rejected)"]
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_vocabulary_that_does_not_fit_the_embedding(tmp_path, corpus_dirs):
    proc = _lmforge("demo", "--output", "out", "--corpus", corpus_dirs[0], "--vocab-size", "512", "--seq-len", "64",
                    "model.preset=llama-test", "model.vocab_size=256", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert "has 512 tokens but the model embedding has 256 rows (model.vocab_size)" in line
    assert not (tmp_path / "out" / "run").exists()


def test_missing_shard_stops_training_before_step_1(tmp_path, tokenizer_dir, prepared_dir):
    """Shards open lazily, so rank 0 checks every shard's size at start (one stat each)."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shards = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
    (data / shards[-1]["path"]).unlink()
    with open(data / shards[0]["path"], "ab") as fh:
        fh.write(b"junk")
    proc = _lmforge("train", str(os.path.dirname(__file__) + "/../pretrain/configs/demo.yaml"), f"data.path={data}",
                    f"data.tokenizer={tokenizer_dir}", "model.preset=llama-test", "run_dir=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = _error_lines(proc)
    assert line == (f"lmforge: error: {data}: 2 of {len(shards) + len(json.loads((data / 'manifest.json').read_text())['splits']['val']['shards'])} "
                    f"shards differ from the manifest: {data / shards[0]['path']} is {shards[0]['bytes'] + 4} bytes, manifest says "
                    f"{shards[0]['bytes']}; {data / shards[-1]['path']} is missing, manifest says {shards[-1]['bytes']}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_train_process_leaves_without_the_interpreter_finalization_after_flushing(tmp_path):
    """``lmforge.cli.entry``: gloo's worker threads could abort a finished rank in the finalization (SIGABRT after
    every file was written); an atexit handler stands for the finalization here. Other commands keep it."""
    script = ("import atexit, sys\natexit.register(lambda: print('finalized', file=sys.stderr))\n"
              "from lmforge.cli import entry\nsys.argv = ['lmforge', *sys.argv[1:]]\nentry()\n")

    def run(*args):
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})

    train = run("train", "missing.yaml")
    assert (train.returncode, _error_lines(train)) == (2, ["lmforge: error: missing.yaml: config file not found"])
    assert "finalized" not in train.stderr  # the error line was flushed, then os._exit
    other = run("checkpoint", "verify", "missing")
    assert other.returncode == 2 and "finalized" in other.stderr
