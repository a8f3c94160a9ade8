"""A prepared shard that rotted after prep (one flipped byte, same size) is caught by ``data.verify_checksums``."""
from __future__ import annotations

import json
import shutil

import pytest

from data_prep.errors import InputError
from data_prep.shards import MANIFEST_NAME, ShardReader
from tests.pretrain.conftest import TINY, Ranks


def test_a_flipped_byte_in_a_shard_stops_the_run_naming_the_shard(tmp_path, tokenizer_dir, prepared_dir):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    records = json.loads((data / MANIFEST_NAME).read_text())["splits"]["train"]["shards"]
    for record in records:  # every train shard, so that the run's first step meets one whatever its order
        with open(data / record["path"], "r+b") as fh:  # a byte in the middle of the token ids: the file still parses
            fh.seek(record["bytes"] // 2)
            byte = fh.read(1)
            fh.seek(record["bytes"] // 2)
            fh.write(bytes([byte[0] ^ 0x01]))
    shard = data / records[0]["path"]

    unchecked = ShardReader(data, "train")
    unchecked.batch(list(range(len(unchecked))))  # size and row count still match: silent without checksums
    checked = ShardReader(data, "train", verify_checksums=True)
    with pytest.raises(InputError, match=f"{shard}: shard sha256 .*, manifest .*records"):
        checked[0]
    assert len(ShardReader(data, "val", verify_checksums=True)[0]) == unchecked.seq_len  # a good shard passes

    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {data}\n  tokenizer: {tokenizer_dir}\n  verify_checksums: true\n")
    (tmp_path / "logs").mkdir()
    ranks = Ranks(config, 2, [*TINY, f"run_dir={tmp_path / 'run'}", "max_steps=2"], tmp_path / "logs")
    codes = ranks.wait()
    for code, log in zip(codes, ranks.logs()):  # each rank reads its own part of the batch: each names its shard
        errors = [line for line in log.splitlines() if "shard sha256" in line]
        assert code != 0 and len(errors) == 1, log[-3000:]
        assert any(f"{data / r['path']}: shard sha256" in errors[0] for r in records), errors
