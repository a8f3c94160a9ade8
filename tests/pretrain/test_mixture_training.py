"""A weight schedule and a repetition cap on a real 2-rank run: resumed mid-way, every loss is bit-identical to the
uninterrupted run's across the schedule's boundary. (A changed schedule changes the data fingerprint, which resume
refuses: tests/pretrain/test_mixture.py.)"""
import shutil

from tests.pretrain.conftest import TINY, Ranks, losses_by_step

RUN = ["deepspeed.precision=fp32", "deepspeed.zero_stage=1", "max_steps=6", "checkpoint.save_every_steps=3"]


def _config(path, prepared_dir, tokenizer_dir, boundary_step: int):
    path.write_text(f"data:\n  tokenizer: {tokenizer_dir}\n  blend:\n    - {{path: {prepared_dir}, weight: 1}}\n"
                    f"    - {{path: {prepared_dir}, weight: 1, max_epochs: 1}}\n"
                    f"  blend_schedule:\n    - {{step: {boundary_step}, weights: [1, 4]}}\n")
    return path


def _start(tmp_path, config, name, *overrides):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    return Ranks(config, 2, [*TINY, f"run_dir={run_dir}", *RUN, *overrides], run_dir)


def test_scheduled_blend_resumed_mid_way_trains_on_the_same_data(tmp_path, prepared_dir, tokenizer_dir):
    config = _config(tmp_path / "train.yaml", prepared_dir, tokenizer_dir, boundary_step=4)
    assert _start(tmp_path, config, "uninterrupted").wait() == [0, 0]
    shutil.copytree(tmp_path / "uninterrupted" / "checkpoints" / "step_00000003", tmp_path / "resumed" / "checkpoints" / "step_00000003")
    # resumed from step 3 (consumed samples alone), it crosses the schedule's boundary at step 4
    assert _start(tmp_path, config, "resumed", "checkpoint.resume=step_00000003").wait() == [0, 0]
    reference = losses_by_step(tmp_path / "uninterrupted")
    assert sorted(reference) == list(range(1, 7))
    resumed = losses_by_step(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6] and resumed == {s: reference[s] for s in (4, 5, 6)}  # bit for bit: the same samples
    log = (tmp_path / "uninterrupted" / "rank0.log").read_text()
    assert "max_epochs 1.0 ->" in log and "effective share" in log  # the effective mixture, logged at start
