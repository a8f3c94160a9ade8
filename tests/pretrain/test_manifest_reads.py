"""Start-up parses each prepared dataset's manifest once (describe_data, the shard check, the train and val readers)."""
import json
import os
import subprocess
import sys

from launch.local import rank_env
from lmforge_common import free_port
from tests.pretrain.conftest import TINY

SPY = """
import collections, json, sys
import data_prep.shards as shards
from pretrain.config import load_config
from pretrain.trainer import train

reads = collections.Counter()
real = shards.read_manifest
def counting(data_dir):
    reads[str(data_dir)] += 1
    return real(data_dir)
shards.read_manifest = counting
train(load_config(None, sys.argv[2:]))
open(sys.argv[1], "w").write(json.dumps(reads))
"""


def test_one_rank_training_reads_each_manifest_once(tmp_path, tokenizer_dir, prepared_dir):
    """A real 1-rank run of one step on a blend that names the dataset twice (the blend path: its describe_data,
    the shard check, the train and val readers of each part), reads spied on in the rank's process."""
    counts = tmp_path / "reads.json"
    overrides = [*TINY, "max_steps=1", f"run_dir={tmp_path / 'run'}", f"data.tokenizer={tokenizer_dir}",
                 f"data.blend=[{{path: {prepared_dir}, weight: 1}}, {{path: {prepared_dir}, weight: 2}}]"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **rank_env(0, 1, "127.0.0.1", free_port(), 1)}
    proc = subprocess.run([sys.executable, "-c", SPY, str(counts), *overrides], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(counts.read_text()) == {str(prepared_dir): 1}
