"""The memory plan (pretrain.plan): DeepSpeed's estimators, the CLI's refusal, and the launchers' preflight."""
import json

import pytest

from lmforge.cli import main
from pretrain.config import TrainConfig
from pretrain.model import build_model_config, count_parameters
from pretrain.plan import AVAILABLE_ENV, plan_memory


@pytest.fixture
def config_file(tmp_path, tokenizer_dir, prepared_dir):
    path = tmp_path / "train.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\nmax_steps: 1\nshow_progress: false\nmodel:\n  preset: llama-test\n"
                    f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n  eval_batches: 1\n")
    return path


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_are_deepspeeds_estimates(stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model_config = build_model_config("llama-350m", 2048, 256, {})
    cfg = TrainConfig()
    cfg.model.preset, cfg.deepspeed.zero_stage, cfg.deepspeed.micro_batch_size = "llama-350m", stage, 1
    plan = plan_memory(cfg, model_config, 256, world_size=4, ranks_per_node=4, device="cpu", available_bytes=2**40)
    n = count_parameters(model_config)
    largest = 2816 * 1024  # one MLP matrix: more than the 2048-row embedding
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, 4, 1, cpu_offload=False, zero_init=True)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(n, 4, 1, cpu_offload=False)
    assert plan.n_params == n and plan.largest_layer_params == largest
    assert plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes == gpu
    assert plan.host_model_bytes == cpu // 4
    assert plan.optimizer_bytes == 12 * n // 4  # fp32 master weights, Adam momentum and variance, partitioned
    assert plan.per_rank_bytes == gpu + cpu // 4 + plan.activations_bytes + plan.overhead_bytes
    assert plan.fits is True


def test_plan_refuses_llama_7b_at_zero3_on_2_ranks(config_file, capsys, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, str(24 * 2**30))  # this dev box: 24 GB
    code = main(["plan", str(config_file), "model.preset=llama-7b", "deepspeed.zero_stage=3",
                 "deepspeed.micro_batch_size=1", "--nproc", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lmforge: error: memory plan: llama-7b at ZeRO stage 3 on 2 rank(s) needs "), err
    assert "12.00 GiB available per rank" in err[-1] and "no single knob fits" in err[-1]


def test_plan_json_and_knob(config_file, capsys, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, str(64 * 2**30))
    assert main(["plan", str(config_file), "--nproc", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["available_bytes"] == 32 * 2**30 and 0 < plan["per_rank_bytes"] < 2**30 and plan["fits"] is True
    # llama-1b at ZeRO 2 on 2 ranks with 30 GiB: stage 3 would fit
    monkeypatch.setenv(AVAILABLE_ENV, str(30 * 2**30))
    assert main(["plan", str(config_file), "model.preset=llama-1b", "deepspeed.micro_batch_size=1", "--nproc", "2",
                 "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fits"] is False
    assert "deepspeed.zero_stage=3 would fit" in captured.err


def test_launch_local_refuses_before_ranks_and_force_runs(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, str(2**20))  # 1 MiB: even llama-test does not fit
    assert main(["launch", "local", "--nproc", "2", str(config_file)]) == 2
    assert "memory plan: llama-test" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no rank started
    assert main(["launch", "local", "--nproc", "2", "--force", str(config_file)]) == 0
    assert "warning (--force): memory plan" in capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file()
