"""Checkpoint file digests: ranks hash disjoint shares, rank 0 merges, verification names the bad file."""
from __future__ import annotations

import os

from pretrain.integrity import checkpoint_files, digest, merge_rank_digests, share_of, verify, write_rank_digests


def fake_checkpoint(root):
    (root / "zero").mkdir(parents=True)
    sizes = {"mp_rank_00_model_states.pt": 5000, "zero/optim_rank0.pt": 3000, "zero/optim_rank1.pt": 3000,
             "rng_state_rank0.pt": 10, "rng_state_rank1.pt": 10, "probe.safetensors": 700}
    for name, size in sizes.items():
        (root / name).write_bytes(os.urandom(size))
    return sizes


def test_ranks_hash_disjoint_shares_that_cover_every_file_and_verify_names_the_bad_one(tmp_path):
    sizes = fake_checkpoint(tmp_path)
    files = checkpoint_files(tmp_path)
    shares = [share_of(tmp_path, files, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    assert abs(sum(sizes[f] for f in shares[0]) - sum(sizes[f] for f in shares[1])) <= 5000  # balanced by bytes
    for rank in range(2):  # simulated ranks, as each would after the save barrier
        write_rank_digests(tmp_path, rank, 2)
    record = merge_rank_digests(tmp_path, 2)
    assert record == digest(tmp_path, sorted(sizes)) and not list(tmp_path.glob("digests-rank*"))
    assert verify(tmp_path, record).status == "ok"

    victim = tmp_path / "zero" / "optim_rank1.pt"
    data = bytearray(victim.read_bytes())
    data[1234] ^= 0x01  # one flipped bit: same size
    victim.write_bytes(bytes(data))
    assert verify(tmp_path, record, "size").status == "ok"
    bad = verify(tmp_path, record, "checksum")
    assert bad.status == "bad" and bad.problems[0].startswith("zero/optim_rank1.pt: xxh3_128 ")
    with open(victim, "r+b") as fh:
        fh.truncate(100)
    line = verify(tmp_path, record, "size").line()
    assert line.endswith("BAD: zero/optim_rank1.pt: 100 bytes, recorded 3000")
    (tmp_path / "probe.safetensors").unlink()
    assert "probe.safetensors: missing" in verify(tmp_path, record, "size").problems
    assert verify(tmp_path, None).status == "unrecorded" and verify(tmp_path, record, "off").status == "unchecked"
