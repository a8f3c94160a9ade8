"""MFU of Llama models in bf16 at seq_len 2048 on one GPU: lmforge next to the Hugging Face Trainer + DeepSpeed (with
Liger-Kernel when it is installed), on the same GPU, model, data, micro batch and generated DeepSpeed config.

Sides, one rank each, trained ``--steps`` optimizer steps per configuration on one resolved config file
(``pretrain.config.to_yaml``, :func:`write_config`) that both read:

- lmforge: the real trainer, ``python -m lmforge train CONFIG``, stopped with ``debug.kill_at_step`` right after
  step ``--steps`` + 1 so that no checkpoint (~19 GB for llama-1b) is written (its exit status -9 is expected).
- peer: ``bench/train_peers.py trainer`` (started by ``train_peers.run_peer`` with ``launch.local.run_local``):
  ``transformers.Trainer(model, TrainingArguments(deepspeed=<lmforge's build_ds_config dict>,
  optim="adamw_torch_fused", bf16=True, per_device_train_batch_size=<lmforge's micro batch>, torch_compile=<compile>,
  gradient_checkpointing=<activation checkpointing>, use_liger_kernel=<Liger>))`` on the same model
  (``pretrain.model.build_model``: preset, seed, ``attn_implementation``) and the same collated batches
  (``common.collate_rows``, document masking). Liger (``--liger auto``, the default) is on when ``liger_kernel`` is
  installed (``pip install -e '.[gpu-bench]'``): its Triton RMSNorm, RoPE, SwiGLU and fused linear cross-entropy;
  without it the peer trains with transformers' own loss. lmforge always trains with its fused chunked loss.

Configurations (:func:`select_configs`): ``--quick``: llama-1b, ZeRO 2, sdpa, compile off (two runs, meant to fit a
10-minute GPU slot with the data preparation; not timed yet). Default (``make bench``): llama-1b, sdpa, compile off,
ZeRO 0 and 2, activation checkpointing off and on. ``--full`` (``make bench-full``): llama-125m, llama-350m and
llama-1b x ZeRO 0 and 2 x every attention backend that can train here (``pretrain.model.attention_problem``:
flash_attention_2 needs the flash-attn package) x compile off and on, plus the default's activation-checkpointing
configurations: 50 configurations, 100 runs, an estimated 2-3 hours on one H100 (not timed yet).

Model: the preset with a 32,000-row embedding (``model.vocab_size``, Llama-2's vocabulary size); llama-1b (24 layers,
hidden 2048, 16 heads, SwiGLU 5504) has about 1.35B parameters. Data: a synthetic corpus generated here (Zipf
pseudo-words, jsonl), a byte-level BPE trained on it and prepared at seq_len 2048 (``lmforge tokenizer train``,
``lmforge prep``); the token values do not change the FLOPs.

MFU, the same for both sides: tokens/s x FLOPs per token / peak. FLOPs per token: ``pretrain.flops`` (6N + 12LHQT,
PaLM appendix B) at seq_len 2048 (``common.flops_per_token``); the recomputation of activation checkpointing is not
counted (model FLOPs). Peak: the device's dense bf16 peak (``pretrain.flops.PEAK_BF16_TFLOPS``, looked up from its
name) or ``--peak-tflops``. Tokens/s: steady state after ``--warmup-steps`` (lmforge: its ``metrics.jsonl`` windows,
logged every 5 steps, ``common.steady_tokens_per_s``; peer: its step-end times, ``train_peers.steady_result``, to step
``--steps`` + 1). lmforge's own logged MFU (median of the same windows) is kept in the details as a cross-check.

Rounds: ``--repeats 1`` by default, one run per side (a lent GPU has minutes), so a row has no range; more rounds
alternate lmforge, peer, lmforge, peer, ... and the row keeps medians and the range of the per-round ratios. Out of
memory: lmforge's first run is retried at half the micro batch until it fits; the peer then runs at that micro batch
(no retry: a peer out of memory is reported in the row's note, with no ratio).

Target (issues 5 and 18): >= 50% for llama-1b bf16 on one H100. Anchors (:data:`ANCHORS`): llm-foundry 41.8% (MPT-1B),
torchtitan 33-39% (Llama-3-8B), Megatron-LM 41-47%.

Without a CUDA GPU the script prints why it skips and exits 0 (``make bench`` goes on), leaving earlier results in
place. Results: ``bench/results/gpu_mfu.json`` (default and ``--full``; rows only ``--full`` runs are noted
"(bench-full)"), ``bench/results/gpu_mfu_quick.json`` (``--quick``, so that it never replaces a sweep). Usage:
``python bench/gpu_mfu.py [--quick | --full] [--micro-batch-size 8] [--steps 40] [--warmup-steps 10] [--repeats 1]
[--liger auto|off] [--peak-tflops X]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import common
import train_peers

SEQ_LEN = 2048
VOCAB_ROWS = 32000
TOKENIZER_VOCAB = 8192
LOG_EVERY = 5
TARGET_MFU_PCT = 50.0
TARGET_PRESET = "llama-1b"
ANCHORS = "llm-foundry 41.8% (MPT-1B, H100); torchtitan 33-39% (Llama-3-8B); Megatron-LM 41-47% (as issue 18 quotes them)"
MODELS = ("llama-125m", "llama-350m", "llama-1b")
ZERO_STAGES = (0, 2)


def _attentions() -> tuple[str, ...]:
    """The ``model.attention`` choices (``pretrain.config.Attention``)."""
    common.use_this_checkout()
    from pretrain.config import Attention

    return get_args(Attention)


@dataclass(frozen=True)
class Config:
    """One measured configuration (always bf16, seq_len :data:`SEQ_LEN`)."""

    preset: str
    zero_stage: int
    attention: str = "sdpa"
    compile: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        return (f"{self.preset} bf16 seq {SEQ_LEN}, ZeRO {self.zero_stage}, {self.attention}, compile "
                f"{'on' if self.compile else 'off'}, {'with' if self.checkpointing else 'no'} activation checkpointing")

    @property
    def slug(self) -> str:
        return f"{self.preset}-z{self.zero_stage}-{self.attention}-c{int(self.compile)}-ac{int(self.checkpointing)}"

    def overrides(self) -> list[str]:
        return [f"model.preset={self.preset}", f"model.attention={self.attention}", f"compile={str(self.compile).lower()}",
                f"deepspeed.zero_stage={self.zero_stage}",
                f"deepspeed.activation_checkpointing={str(self.checkpointing).lower()}"]


QUICK = (Config("llama-1b", 2),)
DEFAULT = tuple(Config("llama-1b", stage, checkpointing=ckpt) for stage in ZERO_STAGES for ckpt in (False, True))


def select_configs(mode: str) -> list[Config]:
    """The configurations of ``mode`` (``quick``, ``default`` or ``full``; see the module docstring), in run order.
    Pure: what can run on this machine is :func:`runnable`'s business."""
    if mode == "quick":
        return list(QUICK)
    if mode == "default":
        return list(DEFAULT)
    if mode != "full":
        raise ValueError(f"mode {mode!r}: quick, default or full")
    sweep = [Config(preset, stage, attention, compiled) for preset in MODELS for stage in ZERO_STAGES
             for attention in _attentions() for compiled in (False, True)]
    return sweep + [c for c in DEFAULT if c not in sweep]


def runnable(configs: list[Config], device: str = "cuda") -> tuple[list[Config], dict[str, str]]:
    """``(configs whose attention can train on device, {name: why not} of the others)``
    (``pretrain.model.attention_problem``, causal LM with document masking)."""
    common.use_this_checkout()
    from pretrain.model import attention_problem

    keep, skipped = [], {}
    for config in configs:
        problem = attention_problem(config.attention, "clm", True, device)
        if problem:
            skipped[config.name] = problem
        else:
            keep.append(config)
    return keep, skipped


@dataclass
class Options:
    """How each configuration is measured (see the command-line options)."""

    steps: int = 40
    warmup_steps: int = 10
    micro_batch_size: int = 8
    repeats: int = 1
    peak_tflops: float = 0.0
    """Dense bf16 peak of the device, TFLOP/s (resolved: > 0)."""
    liger: bool = False
    liger_why: str = "off"
    accelerator: str = "cuda"
    """``cuda``, or ``cpu`` for a dry run of the mechanics (DeepSpeed's ``DS_ACCELERATOR``)."""


def synthetic_corpus(path: Path, words: int, seed: int = 0) -> None:
    """Write about ``words`` Zipf-distributed pseudo-words as jsonl documents of 200-4000 words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(30000)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    stream = rng.choice(len(lexicon), size=words, p=weights / weights.sum())
    with open(path, "w", encoding="utf-8") as fh:
        at = 0
        while at < words:
            n = int(rng.integers(200, 4000))
            fh.write(json.dumps({"text": " ".join(lexicon[i] for i in stream[at:at + n])}) + "\n")
            at += n


def prepare_data(root: Path) -> tuple[Path, Path]:
    """``(tokenizer_dir, prepared_dir)`` of the synthetic corpus at seq_len :data:`SEQ_LEN`."""
    corpus, tok, data = root / "corpus.jsonl", root / "tokenizer", root / "data"
    synthetic_corpus(corpus, words=2_000_000)
    env = common.python_env()
    common.check_child(common.run_child(common.lmforge_cmd("tokenizer", "train", "--input", str(corpus), "--output", str(tok),
                                                           "--vocab-size", str(TOKENIZER_VOCAB)), env=env), "tokenizer train")
    common.check_child(common.run_child(common.lmforge_cmd("prep", "--input", str(corpus), "--tokenizer", str(tok),
                                                           "--output", str(data), "--seq-len", str(SEQ_LEN),
                                                           "--val-fraction", "0.05"), env=env), "prep")
    return tok, data


def write_config(tok: Path, data: Path, config: Config, micro_batch: int, steps: int, folder: Path,
                 peak_tflops: float) -> Path:
    """``folder/train.yaml``: the resolved training config both sides train (``steps`` + 1 optimizer steps)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.yaml"
    base.write_text(f"data:\n  path: {data}\n  tokenizer: {tok}\n", encoding="utf-8")
    overrides = [*config.overrides(), f"model.vocab_size={VOCAB_ROWS}", "deepspeed.precision=bf16",
                 f"deepspeed.micro_batch_size={micro_batch}", f"max_steps={steps + 1}", f"log_every_steps={LOG_EVERY}",
                 "optim.lr=3e-4", "optim.warmup_steps=10", "data.eval_batches=1", "show_progress=false",
                 "checkpoint.resume=never", f"peak_tflops={peak_tflops}"]
    return common.write_train_config(folder / "train.yaml", base, overrides)


def side_env(accelerator: str) -> dict[str, str]:
    """Environment of a side's processes: GPUs hidden for a CPU dry run, else DeepSpeed told the accelerator."""
    return dict(common.CPU_ONLY_ENV) if accelerator == "cpu" else {"DS_ACCELERATOR": accelerator}


def failure(output: str, returncode: int | None) -> str:
    return "out of memory" if "out of memory" in output.lower() else f"exit {returncode}"


def measure(config_file: Path, run_dir: Path, steps: int, warmup_steps: int, accelerator: str = "cuda") -> dict:
    """lmforge on ``config_file``: steady tokens/s after ``warmup_steps``, its logged MFU (median of those windows,
    percent), peak memory (GiB) and wall time (s), or ``{"error": ..., "output_tail": ...}``."""
    result = common.run_child(common.lmforge_cmd("train", str(config_file), f"run_dir={run_dir}",
                                                 f"debug.kill_at_step={steps + 1}"), env=common.python_env(**side_env(accelerator)))
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    measured = [r for r in records if "tokens_per_s" in r and r["step"] > warmup_steps]
    if result.returncode not in (0, -9) or not measured:
        return {"error": failure(result.output, result.returncode), "output_tail": result.output[-3000:]}
    logged = [r["mfu"] for r in measured if "mfu" in r]
    return {"tokens_per_s": common.steady_tokens_per_s(metrics, warmup_steps),
            "logged_mfu_pct": 100 * common.median(logged) if logged else None,
            "peak_mem_gib": max(r["peak_mem_gib"] for r in measured), "windows": len(measured),
            "wall_s": round(result.wall_s, 1)}


def measure_peer(config_file: Path, opts: Options) -> dict:
    """The Trainer peer on ``config_file`` (one rank): steady tokens/s after ``opts.warmup_steps``, peak memory (GiB),
    Liger's patched modules, wall time (s), or ``{"error": ..., "output_tail": ...}``."""
    try:
        got = train_peers.run_peer("trainer", config_file, config_file.parent, "own", nproc=1, env=side_env(opts.accelerator),
                                   liger=opts.liger, skip_steps=opts.warmup_steps)
    except RuntimeError as exc:
        return {"error": failure(str(exc), None), "output_tail": str(exc)[-3000:]}
    keys = ("tokens_per_s", "steps", "skip_steps", "engine", "param_dtype", "liger_modules", "peak_mem_gib", "wall_s")
    return {k: got[k] for k in keys}


def first_lmforge_run(config: Config, tok: Path, data: Path, folder: Path, opts: Options) -> tuple[Path, dict]:
    """lmforge's first run of ``config``, its micro batch halved after each out-of-memory exit:
    ``(the config file it trained, its result with micro_batch_size)``."""
    micro = opts.micro_batch_size
    while True:
        print(f"gpu_mfu: {config.name}: lmforge, micro batch {micro}", flush=True)
        config_file = write_config(tok, data, config, micro, opts.steps, folder / f"mb{micro}", opts.peak_tflops)
        got = measure(config_file, config_file.parent / "run0", opts.steps, opts.warmup_steps, opts.accelerator)
        if got.get("error") != "out of memory" or micro == 1:
            return config_file, {**got, "micro_batch_size": micro}
        micro //= 2


def measure_config(config: Config, tok: Path, data: Path, folder: Path, opts: Options) -> dict:
    """``opts.repeats`` rounds (at least 1) of lmforge then the peer on ``config``, both at lmforge's final micro
    batch: ``{"micro_batch_size", "flops_per_token", "parameters", "settings", "lmforge": [...], "peer": [...]}``.
    Stops at lmforge's first error; runs the peer no more after its first error."""
    config_file, first = first_lmforge_run(config, tok, data, folder, opts)
    out: dict = {"micro_batch_size": first["micro_batch_size"], "lmforge": [first], "peer": []}
    for i in range(max(1, opts.repeats)):
        if i:
            print(f"gpu_mfu: {config.name}: lmforge, round {i + 1}", flush=True)
            out["lmforge"].append(measure(config_file, config_file.parent / f"run{i}", opts.steps, opts.warmup_steps,
                                          opts.accelerator))
        if "error" in out["lmforge"][-1]:
            break
        if not any("error" in r for r in out["peer"]):
            print(f"gpu_mfu: {config.name}: peer, round {i + 1}", flush=True)
            out["peer"].append(measure_peer(config_file, opts))
    from pretrain.config import load_config
    from pretrain.trainer import preflight

    cfg = load_config(config_file)
    _, model_config, seq_len = preflight(cfg, device=opts.accelerator)
    out["flops_per_token"], out["parameters"] = common.flops_per_token(model_config, seq_len)
    out["settings"] = settings(cfg, opts, seq_len)
    return out


def settings(cfg, opts: Options, seq_len: int = SEQ_LEN) -> dict[str, str]:
    """Each side's exact settings, for the row's note and the details."""
    ds, opt = cfg.deepspeed, cfg.optim
    shared = (f"bf16, micro batch {ds.micro_batch_size}, grad accumulation {ds.gradient_accumulation_steps}, seq_len "
              f"{seq_len}, attention {cfg.model.attention}, ZeRO {ds.zero_stage}, compile {'on' if cfg.compile else 'off'}, "
              f"activation checkpointing {'on' if ds.activation_checkpointing else 'off'}, lr {opt.lr}, "
              f"warmup {opt.warmup_steps} + {opt.schedule}, grad clip {opt.grad_clip}")
    loss = "Liger's fused linear cross-entropy" if opts.liger else "transformers' ForCausalLMLoss (full float32 logits)"
    return {"shared": shared,
            "lmforge": f"lmforge train: torch.optim.AdamW(fused=True), fused chunked loss "
                       f"(model.loss_chunk_tokens={cfg.model.loss_chunk_tokens})",
            "peer": f"transformers.Trainer + DeepSpeed (lmforge's build_ds_config), optim='adamw_torch_fused', "
                    f"Liger {opts.liger_why}, loss: {loss}"}


def mfu_pct(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation, percent: tokens/s x FLOPs per token over the peak (TFLOP/s)."""
    return 100 * tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def _throughput(runs: list[dict]) -> str:
    return (f"{common.median([r['tokens_per_s'] for r in runs]):,.0f} tokens/s, "
            f"peak {max(r['peak_mem_gib'] for r in runs):.1f} GiB")


def config_row(config: Config, got: dict, opts: Options, device: str, bench_full: bool = False) -> dict | None:
    """The row of one configuration: lmforge's MFU vs the peer's (ratio above 1: lmforge higher), or None when
    lmforge never finished a run."""
    lm = [r for r in got["lmforge"] if "error" not in r]
    if not lm:
        return None
    peer = [r for r in got["peer"] if "error" not in r]
    peer_error = next((r["error"] for r in got["peer"] if "error" in r), None)
    fpt, s = got["flops_per_token"], got["settings"]
    to_mfu = lambda runs: [mfu_pct(r["tokens_per_s"], fpt, opts.peak_tflops) for r in runs]
    rounds = (f"{len(lm)} alternating rounds (lmforge, peer, ...)" if opts.repeats > 1 else
              "one run per side (--repeats 1, the default on a GPU, to fit a lent GPU's time: no alternation, no range)")
    peer_part = f"peer {_throughput(peer)}" if peer else f"peer failed: {peer_error} at lmforge's micro batch"
    note = (f"{device}. Both: {s['shared']}. lmforge: {s['lmforge']}. Peer: {s['peer']}. lmforge {_throughput(lm)}; {peer_part}. "
            f"MFU = tokens/s x {fpt:.4g} FLOPs/token (6N + 12LHQT) / {opts.peak_tflops:g} TFLOP/s, both sides; "
            f"{opts.warmup_steps} warm-up steps left out; {rounds}. Anchors: {ANCHORS}" + (" (bench-full)" if bench_full else ""))
    peer_name = "HF Trainer + DeepSpeed" + (" + Liger" if opts.liger else "")
    return common.row(f"MFU, {config.name}", "%", to_mfu(lm), to_mfu(peer) if peer else None, peer_name,
                      target=f">= {TARGET_MFU_PCT:g}%" if config.preset == TARGET_PRESET else "", note=note)


def liger_choice(flag: str, accelerator: str = "cuda") -> tuple[bool, str]:
    """``(use Liger, why)`` for ``--liger`` ``auto`` (on when ``liger_kernel`` is installed, on CUDA) or ``off``."""
    if flag == "off":
        return False, "off (--liger off)"
    if accelerator != "cuda":
        return False, f"off (Liger's Triton kernels need CUDA; accelerator {accelerator})"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "off (liger-kernel not installed: pip install -e '.[gpu-bench]')"
    from importlib import metadata

    return True, f"on (liger-kernel {metadata.version('liger-kernel')}, use_liger_kernel=True)"


def run_sweep(configs: list[Config], opts: Options, mode: str, device: str) -> tuple[list[dict], dict]:
    """Measure ``configs`` on data prepared once; ``(rows, details by configuration name)``."""
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-mfu-") as tmp_name:
        tmp = Path(tmp_name)
        tok, data = prepare_data(tmp)
        for config in configs:
            got = measure_config(config, tok, data, tmp / config.slug, opts)
            details[config.name] = got
            for side in ("lmforge", "peer"):
                for r in got[side]:
                    if "error" in r:
                        print(f"gpu_mfu: {config.name}: {side}: {r['error']}\n{r['output_tail']}", flush=True)
            row = config_row(config, got, opts, device, bench_full=mode == "full" and config not in DEFAULT)
            if row:
                rows.append(row)
    return rows, details


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="llama-1b, ZeRO 2, sdpa, compile off: fits a 10-minute GPU slot")
    mode.add_argument("--full", action="store_true", help="the sweep: 3 models x ZeRO 0/2 x attention x compile (hours)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences of 2048 tokens per step (halved on OOM)")
    parser.add_argument("--steps", type=int, default=40, help="measured optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup-steps", type=int, default=10, help=f"first steps left out (a multiple of {LOG_EVERY})")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per configuration; above 1 the sides alternate")
    parser.add_argument("--liger", choices=["auto", "off"], default="auto", help="the peer with Liger when installed")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, TFLOP/s; 0 = look it up by name")
    args = parser.parse_args(argv)
    if args.warmup_steps % LOG_EVERY or args.steps < args.warmup_steps + LOG_EVERY:
        parser.error(f"--warmup-steps {args.warmup_steps}, --steps {args.steps}: need a warm-up that is a multiple of "
                     f"{LOG_EVERY} (lmforge's log windows) and steps >= warm-up + {LOG_EVERY}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.use_this_checkout()
    import torch

    if not torch.cuda.is_available():
        print("gpu_mfu: skipped: no CUDA GPU visible (torch.cuda.is_available() is False); run "
              "`python bench/gpu_mfu.py [--quick | --full]` on a GPU machine to record lmforge's MFU next to the "
              "HF Trainer + DeepSpeed", flush=True)
        return 0
    from pretrain.flops import peak_flops_per_device

    device = torch.cuda.get_device_name()
    peak = peak_flops_per_device(args.peak_tflops)
    if peak is None:
        print(f"gpu_mfu: no dense bf16 peak is known for {device}: pass --peak-tflops", flush=True)
        return 2
    mode = "quick" if args.quick else "full" if args.full else "default"
    configs, skipped = runnable(select_configs(mode))
    liger, liger_why = liger_choice(args.liger)
    opts = Options(args.steps, args.warmup_steps, args.micro_batch_size, args.repeats, peak / 1e12, liger, liger_why)
    for name, why in skipped.items():
        print(f"gpu_mfu: {name}: skipped: {why}", flush=True)
    rows, configs_details = run_sweep(configs, opts, mode, device)
    details = {"device": device, "mode": mode, "seq_len": SEQ_LEN, "vocab_rows": VOCAB_ROWS, "steps": args.steps,
               "warmup_steps": args.warmup_steps, "repeats": args.repeats, "peak_tflops": opts.peak_tflops,
               "liger": liger_why, "skipped": skipped, "configs": configs_details}
    common.print_rows(rows)
    peer = "HF Trainer + DeepSpeed" + (" + Liger" if liger else "")
    common.write_result("gpu_mfu_quick" if mode == "quick" else "gpu_mfu",
                        f"MFU on one GPU ({device}): lmforge vs {peer}{' (--quick)' if mode == 'quick' else ''}", rows, details)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
