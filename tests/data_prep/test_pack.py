import numpy as np
import pytest

from data_prep.pack import Packer


def test_concat_and_chunk_records_document_boundaries_and_conserves_tokens():
    p = Packer(seq_len=4, eos_id=0)
    out = []
    for doc in ([1, 2], [3, 4, 5, 6, 7], [8]):
        out.extend(p.add(doc))
    p.finish()
    seqs = [s.tolist() for s, _ in out]
    starts = [st for _, st in out]
    assert seqs == [[1, 2, 0, 3], [4, 5, 6, 7]]
    assert starts == [[0, 3], []]
    assert p.tokens == 3 + 6 + 2 and p.tokens_dropped == 3  # [0, 8, 0] left over
    assert p.tokens == p.sequences * 4 + p.tokens_dropped


def test_bos_is_added_only_when_it_differs_from_eos():
    same = Packer(seq_len=8, eos_id=0, bos_id=0)
    list(same.add([5]))
    assert same.tokens == 2
    diff = Packer(seq_len=3, eos_id=0, bos_id=9)
    (seq, starts), = list(diff.add([5]))
    assert seq.tolist() == [9, 5, 0] and starts == [0]


def test_huge_document_streams_out_many_sequences():
    p = Packer(seq_len=16, eos_id=0)
    seqs = list(p.add(np.arange(1, 1000)))
    assert len(seqs) == 1000 // 16
    assert seqs[1][1] == []


def test_seq_len_must_allow_a_token_and_its_target():
    with pytest.raises(ValueError):
        Packer(seq_len=1, eos_id=0)
