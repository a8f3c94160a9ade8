"""A prep worker killed by a signal (the out-of-memory killer's SIGKILL) is named with the input it was reading."""
import os
import signal
import time

import pytest

from data_prep.encode import map_blocks
from data_prep.errors import WorkerDiedError
from data_prep.reader import Block


def _killed_on_big(block: Block) -> int:
    """Test hook run in a worker: a block of ``big.jsonl`` SIGKILLs its worker (as the OOM killer would)."""
    if block.source.endswith("big.jsonl"):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return block.first_record


def test_a_worker_killed_by_sigkill_is_named_with_its_input_file():
    ok = [Block(f"small-{i}.jsonl", "jsonl", i, b"", 0) for i in range(3)]
    assert list(map_blocks(_killed_on_big, ok, workers=2)) == [0, 1, 2]  # markers are cleared after each block
    blocks = ok + [Block("/data/big.jsonl", "jsonl", 4096, b"", 0)] + ok
    with pytest.raises(WorkerDiedError, match=r"worker pid \d+ while reading /data/big.jsonl \(from record 4096\) died from a "
                                              r"signal .*likely the out-of-memory killer") as err:
        list(map_blocks(_killed_on_big, blocks, workers=2))
    assert "small-" not in str(err.value)  # the other worker, ended by the pool, is not blamed
    assert "\n" not in str(err.value)
