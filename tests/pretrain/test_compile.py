"""compile=true: DeepSpeed's engine.compile() (torch.compile, inductor) trains to the eager run's losses within rounding."""
import pytest

from tests.pretrain.conftest import losses_by_step

STEPS = ["max_steps=3", "deepspeed.precision=fp32", "data.eval_batches=0", "model.loss_chunk_tokens=0"]


def test_compiled_losses_equal_eager_losses(start_run, tmp_path):
    assert start_run("eager", 1, *STEPS).wait() == [0]
    assert start_run("compiled", 1, *STEPS, "compile=true").wait(timeout_s=600) == [0]
    eager, compiled = losses_by_step(tmp_path / "eager"), losses_by_step(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), (step, eager, compiled)
    log = (tmp_path / "compiled" / "rank0.log").read_text()
    assert log.count("compile: the first step took") == 1, log[-2000:]
    assert "compile: the first step" not in (tmp_path / "eager" / "rank0.log").read_text()
