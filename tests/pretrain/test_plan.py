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


def test_zero3_fp32_model_states_are_16_bytes_per_parameter_plus_one_sub_group():
    """fp32 partitions are the master weights (pretrain.engine.share_fp32_master_weights): 4 params + 4 grads + 8 Adam
    bytes per parameter over the ranks, the estimator's gathered layers, and one sub-group's fp32 gradient copy."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from pretrain.engine import zero3_sizes

    model_config = build_model_config("llama-350m", 2048, 256, {})
    cfg = TrainConfig()
    cfg.model.preset, cfg.deepspeed.zero_stage, cfg.deepspeed.precision = "llama-350m", 3, "fp32"
    plan = plan_memory(cfg, model_config, 256, world_size=4, ranks_per_node=4, device="cpu", available_bytes=2**40)
    n = count_parameters(model_config)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(n, plan.largest_layer_params, 4, 1, cpu_offload=False, zero_init=True)
    gathered = gpu - 18 * (n // 4)
    assert (plan.params_bytes, plan.grads_bytes) == (4 * (n // 4) + gathered, 4 * (n // 4))
    assert plan.optimizer_bytes == 8 * (n // 4) + 4 * zero3_sizes(model_config)["sub_group_size"]
    assert "lmforge's count of 16 bytes per parameter" in plan.estimator


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


def test_launch_mpi_refuses_before_starting_ranks(config_file, tmp_path, capsys, monkeypatch):
    """The refusal comes before mpirun is looked for: no rank, no run dir (--force: test_mpi's resumed run)."""
    monkeypatch.setenv(AVAILABLE_ENV, str(2**20))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no mpirun here: reaching it would fail differently
    assert main(["launch", "mpi", "--np", "2", str(config_file)]) == 2
    assert "lmforge: error: memory plan: llama-test at ZeRO stage 2 on 2 rank(s) needs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _fake_bin(folder, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(0o755)


def test_launch_slurm_enforces_the_plan_where_the_nodes_memory_is_known(config_file, tmp_path, capsys, monkeypatch):
    """CPU nodes: --mem, else sinfo's smallest node of the partition; GPU nodes: --gpu-mem (and the host memory,
    as above, for model construction and offloaded states). Refused before sbatch: a fake sbatch records a call."""
    bin_dir = tmp_path / "bin"
    _fake_bin(bin_dir, "sbatch", f"echo called >> {tmp_path / 'sbatch-called'}; echo 4242")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    launch = ["launch", "slurm", "--nodes", "2"]
    assert main([*launch, "--mem", "1M", str(config_file)]) == 2
    assert "on 2 rank(s) needs" in capsys.readouterr().err  # refused: --mem per node
    _fake_bin(bin_dir, "sinfo", 'echo "1+"')  # RealMemory 1 MiB: the partition's smallest node
    assert main([*launch, "--partition", "cpu", str(config_file)]) == 2
    assert "0.00 GiB available per rank (1 rank(s) per node, cpu)" in capsys.readouterr().err
    gpu = ["launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--mem", "64G"]
    assert main([*gpu, "--gpu-mem", "1M", str(config_file)]) == 2
    assert "available per rank (per device, gpu)" in capsys.readouterr().err
    assert main([*gpu, "--gpu-mem", "80G", "--mem", "1M", str(config_file)]) == 2
    assert "of host memory per rank" in capsys.readouterr().err
    assert not (tmp_path / "sbatch-called").exists() and not (tmp_path / "run").exists()
    # known and enough: submitted, after one line saying so
    assert main([*gpu, "--gpu-mem", "80G", str(config_file)]) == 0
    err = capsys.readouterr().err
    assert "GiB available: fits" in err and (tmp_path / "sbatch-called").is_file()


def test_gpu_plan_with_offload_checks_host_memory(config_file):
    from pretrain.config import load_config
    from pretrain.plan import MemoryPlanError, check_memory

    cfg = load_config(str(config_file), ["model.preset=llama-1b", "deepspeed.zero_stage=3",
                                         "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                                         "deepspeed.micro_batch_size=1"])
    device = 80 * 2**30
    plan = check_memory(cfg, 8, 8, "gpu", available_bytes=device, host_available_bytes=2**40)
    assert plan.fits is True and plan.per_rank_bytes < 2 * 2**30  # on the device: little (1 GiB of it runtime)
    assert plan.host_per_rank_bytes > 3 * 2**30  # the offloaded states: 1.1B parameters x 18 bytes x 1.5 / 8
    with pytest.raises(MemoryPlanError) as refused:
        check_memory(cfg, 8, 8, "gpu", available_bytes=device, host_available_bytes=2 * 2**30)
    assert refused.value.plan.fits is False
    assert "of host memory per rank (model construction and offloaded states), 2.00 GiB available" in str(refused.value)
    assert check_memory(cfg, 8, 8, "gpu", available_bytes=device, host_available_bytes=None).fits is True  # unknown
    assert check_memory(cfg, 8, 8, "gpu", available_bytes=None, host_available_bytes=2**40).fits is None
