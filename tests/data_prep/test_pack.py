import numpy as np
import pytest

from data_prep.pack import Framing, Packer, StreamPacker


def _feed(packer, docs, eos=0):
    stream = np.concatenate([np.asarray(d + [eos]) for d in docs])
    return packer.add(stream, [len(d) + 1 for d in docs])


def test_concat_and_chunk_records_document_boundaries_and_conserves_tokens():
    p = StreamPacker(row_tokens=4)
    rows, offsets, starts = _feed(p, [[1, 2], [3, 4, 5, 6, 7], [8]])
    assert rows.tolist() == [[1, 2, 0, 3], [4, 5, 6, 7]]
    per_row = [starts[offsets[i]:offsets[i + 1]].tolist() for i in range(len(rows))]
    assert per_row == [[0, 3], []]
    tail, tail_starts = p.take_tail()
    assert tail.tolist() == [0, 8, 0] and tail_starts.tolist() == [1]
    assert p.tokens == 3 + 6 + 2 == p.rows * 4 + len(tail)


def test_carry_crosses_calls_and_equals_one_big_call():
    docs = [list(range(1, n + 1)) for n in (5, 1, 9, 3, 2, 7, 4)]
    one = StreamPacker(row_tokens=5)
    r1, o1, s1 = _feed(one, docs)
    split = StreamPacker(row_tokens=5)
    parts = [_feed(split, docs[:3]), _feed(split, docs[3:])]
    rows = np.concatenate([p[0] for p in parts])
    starts = [p[2][p[1][i]:p[1][i + 1]].tolist() for p in parts for i in range(len(p[0]))]
    assert rows.tolist() == r1.tolist()
    assert starts == [s1[o1[i]:o1[i + 1]].tolist() for i in range(len(r1))]
    assert one.take_tail()[0].tolist() == split.take_tail()[0].tolist()


def test_stitched_tails_get_a_boundary_unless_they_open_a_row():
    p = StreamPacker(row_tokens=4)
    p.add_segments(np.array([7, 7]), np.array([], dtype=np.int64), boundary_at_start=True)  # opens a row: no boundary
    rows, offsets, starts = p.add_segments(np.array([9, 9, 9]), np.array([1]), boundary_at_start=True)
    assert rows.tolist() == [[7, 7, 9, 9]] and starts.tolist() == [2, 3]


def test_huge_document_streams_out_many_sequences():
    p = StreamPacker(row_tokens=16)
    rows, offsets, _ = p.add(np.arange(1, 1001), [1000])
    assert len(rows) == 1000 // 16
    assert offsets.tolist()[:3] == [0, 1, 1]  # only row 0 holds a document start


def test_framing_adds_template_tokens_and_pads_the_tail():
    f = Framing(seq_len=6, prefix=(101,), suffix=(102,), pad_id=0)
    assert f.row_tokens == 4
    rows = f.frame(np.array([[1, 2, 3, 4]]), np.array([0, 1]), np.array([2]), np.dtype(np.uint16))
    assert rows.ids.tolist() == [[101, 1, 2, 3, 4, 102]] and rows.starts.tolist() == [3]
    padded = f.frame_padded(np.array([5, 6]), np.array([0]), np.dtype(np.uint16))
    assert padded.ids.tolist() == [[101, 5, 6, 102, 0, 0]] and padded.num_tokens.tolist() == [4]


def test_row_must_allow_a_token_and_its_target():
    with pytest.raises(ValueError):
        StreamPacker(row_tokens=1)


def test_per_document_packer_adds_bos_and_eos_and_counts_the_dropped_tail():
    p = Packer(seq_len=4, eos_id=0, bos_id=9)
    out = [x for doc in ([1, 2], [3, 4, 5]) for x in p.add(doc)]
    assert [(s.tolist(), st) for s, st in out] == [([9, 1, 2, 0], [0]), ([9, 3, 4, 5], [0])]
    assert out[0][0].dtype == np.int64
    p.finish()
    assert (p.documents, p.tokens, p.sequences, p.tokens_dropped) == (2, 9, 2, 1)
    assert Packer(seq_len=4, eos_id=0, bos_id=0).prefix == []  # bos only when it differs from eos
