"""Source mixtures: repetition caps and weight schedules, by index math (no processes)."""
import numpy as np
import pytest

from data_prep.blend import BlendOrder
from data_prep.errors import UserError
from data_prep.mixture import MixtureOrder
from pretrain.config import load_config
from pretrain.data import micro_batches
from pretrain.sources import describe_data, schedule_samples

LENGTHS = [1000, 50, 300]


def test_one_phase_without_caps_is_the_plain_blend():
    plain, mix = BlendOrder(LENGTHS, [5, 1, 2], seed=3), MixtureOrder(LENGTHS, [(0, [5, 1, 2])], seed=3)
    pos = np.arange(20_000)
    assert all((a == b).all() for a, b in zip(plain.locate(pos), mix.locate(pos)))
    assert len(mix.segments) == 1


def test_a_capped_source_is_read_at_most_its_cap_and_its_share_goes_to_the_others():
    run = 20_000  # uncapped, the 50-sequence source (weight 1/8) would be read 2,500 times: 50 epochs
    mix = MixtureOrder(LENGTHS, [(0, [5, 1, 2])], max_epochs=[0, 2, 0], seed=7)
    d, seq = mix.locate(np.arange(run))
    small = seq[d == 1]
    assert len(small) == 100 == mix.counts(run)[1]  # exactly 2 x its size, never more
    assert (np.bincount(small, minlength=50) == 2).all()  # each sequence twice: two full passes
    assert len(set(small[:50].tolist())) == 50 and small[:50].tolist() != small[50:].tolist()
    cut = mix.segments[1].start  # the capped source's last draw ends the first segment
    assert mix.segments[0].end == cut and d[cut - 1] == 1 and (d[cut:] != 1).all()
    after = np.bincount(d[cut:], minlength=3)
    assert abs(after[0] / after[2] - 5 / 2) < 0.01  # redistributed in proportion to the others' weights
    assert (mix.counts(run) == np.bincount(d, minlength=3)).all()
    assert mix.epochs(run)[1] == 2.0
    big = seq[d == 0]  # the uncapped sources continue their permutations across the cut: full passes, no restart
    assert sorted(big[:1000].tolist()) == list(range(1000))


def test_every_source_exhausted_is_a_one_line_error():
    mix = MixtureOrder([10, 20], [(0, [1, 1])], max_epochs=[1, 1])
    assert mix.counts(30).tolist() == [10, 20]
    with pytest.raises(UserError, match="max_epochs"):
        mix.locate(np.array([30]))
    with pytest.raises(UserError, match=r"phase 1 .*weights \[0.0, 0.0\]"):
        MixtureOrder([10, 20], [(0, [1, 1]), (5, [0.0, 0.0])])


def _positions(mix, start, count):
    return [a.tolist() for a in mix.locate(np.arange(start, start + count))]


def test_a_schedule_changes_weights_at_its_boundary_and_resumes_from_consumed_samples():
    phases = [(0, [1, 1, 0]), (1000, [1, 1, 8])]  # an annealing phase that brings in the third source
    mix = MixtureOrder(LENGTHS, phases, seed=2)
    d, _ = mix.locate(np.arange(8000))
    assert (d[:1000] != 2).all() and abs((d[1000:] == 2).mean() - 0.8) < 0.01
    # resumed mid-way (a new object, from consumed samples alone) reads exactly the same samples
    again = MixtureOrder(LENGTHS, phases, seed=2)
    assert _positions(again, 3000, 2000) == [a[3000:5000].tolist() for a in mix.locate(np.arange(8000))]
    # micro_batches of 2 ranks: an uninterrupted run and one resumed at 3,200 consumed samples agree
    reader = _IndexReader(mix)
    full = [[next(it) for _ in range(100)] for it in (micro_batches(reader, r, 2, 8, seed=0) for r in range(2))]
    resumed = [[next(it) for _ in range(50)] for it in (micro_batches(reader, r, 2, 8, seed=0, consumed_samples=800) for r in range(2))]
    for f, r in zip(full, resumed):  # the same (source, sequence) pairs, at the same positions, across the boundary
        assert [b.input_ids.tolist() for b in f[50:]] == [b.input_ids.tolist() for b in r]
        assert [b.sample_indices.tolist() for b in f[50:]] == [b.sample_indices.tolist() for b in r]
    seen = sorted(i for f in full for b in f for i in b.sample_indices.tolist())
    assert seen == list(range(1600))  # ranks disjoint, nothing skipped
    assert any((b.input_ids[:, 0] == 2).any() for b in resumed[0])  # the resumed stretch crosses the phase boundary


class _IndexReader:
    """Reads the blend position itself (what micro_batches hands a blend) and the mixture's sequence."""
    ordered = True

    def __init__(self, mix):
        self.mix = mix

    def __len__(self):
        return 10**9

    def read_batch(self, idx):
        d, seq = self.mix.locate(idx)
        return np.stack([d, seq], axis=1), [[] for _ in idx], np.zeros(len(idx), dtype=np.int64)


def test_config_schedule_is_typed_checked_and_fingerprinted(prepared_dir, tmp_path):
    base = ["data.tokenizer=x", f"data.blend=[{{path: {prepared_dir}, weight: 1, max_epochs: 2}}, {{path: {prepared_dir}}}]"]
    cfg = load_config(None, base + ["data.blend_schedule=[{step: 10, weights: [1, 3]}]"])
    assert schedule_samples(cfg.data, 32) == [(320, [1.0, 3.0])]
    with pytest.raises(Exception, match=r"blend_schedule steps \[10, 5\]"):
        load_config(None, base + ["data.blend_schedule=[{step: 10, weights: [1, 3]}, {step: 5, weights: [1, 1]}]"])
    from dataclasses import asdict
    data = asdict(cfg.data)
    fp = describe_data(data)[1]
    changed = {**data, "blend_schedule": [{"step": 20, "weights": [1.0, 3.0]}]}
    assert describe_data(changed)[1] != fp  # a resume on a changed schedule is refused as changed data
    plain = {**data, "blend_schedule": [], "blend": [{**b, "max_epochs": 0.0} for b in data["blend"]]}
    legacy = {**plain, "blend": [{"path": b["path"], "weight": b["weight"]} for b in plain["blend"]]}
    assert describe_data(plain)[1] == describe_data(legacy)[1]  # plain blends keep their fingerprint


def test_model_card_shows_tokens_and_epochs_per_source():
    from types import SimpleNamespace

    from pretrain.export.model_card import _mixture

    blend = [{"path": "big", "weight": 3.0, "max_epochs": 0.0}, {"path": "small", "weight": 1.0, "max_epochs": 2.0}]
    info = SimpleNamespace(
        manifest={"seq_len": 64, "blend": [{"sequences": 1000}, {"sequences": 50}]},
        config={"seed": 0, "data": {"blend": blend, "blend_schedule": []},
                "deepspeed": {"micro_batch_size": 4, "gradient_accumulation_steps": 2}},
        state={"consumed_samples": 2000, "world_size": 2})
    lines = _mixture(info)
    assert "2,000 sequences trained on" in lines[0]
    # 1/4 of 2,000 would be 500 = 10 epochs of the small source; capped at 2 epochs = 100 sequences, the rest from big
    assert lines[2] == "  - `small`: 100 sequences = 6,400 tokens (5.0%), 2.00 epochs of its 50 sequences, capped at 2.0 epochs"
    assert lines[1].startswith("  - `big`: 1,900 sequences = 121,600 tokens (95.0%), 1.90 epochs")
    single = SimpleNamespace(manifest={"seq_len": 64, "splits": {"train": {"sequences": 400}}}, config={"data": {}}, state={"consumed_samples": 1000})
    assert _mixture(single) == ["- trained on: 1,000 sequences = 64,000 tokens, 2.50 epochs of the data"]
