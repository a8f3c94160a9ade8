"""``debug.prebuilt_batches`` (the loader bench's in-situ baseline) trains on the very batches the loader gives."""
from tests.pretrain.conftest import losses_by_step, start_run  # noqa: F401  (start_run: a fixture)


def test_prebuilt_batches_train_on_the_same_data_as_the_loader(start_run, tmp_path):  # noqa: F811
    common = ["deepspeed.precision=fp32", "max_steps=3", "checkpoint.resume=never"]
    assert start_run("loader", 1, *common).wait() == [0]
    assert start_run("prebuilt", 1, *common, "debug.prebuilt_batches=true").wait() == [0]
    loader, prebuilt = losses_by_step(tmp_path / "loader"), losses_by_step(tmp_path / "prebuilt")
    assert sorted(loader) == [1, 2, 3] and prebuilt == loader  # every step's loss, bit for bit
