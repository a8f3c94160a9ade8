"""Packaging for lmforge.

torch, DeepSpeed, transformers, datasets and tokenizers are capped at the minor versions the suite last
ran with (below). On CPU-only machines install the CPU wheel of torch first (``pip install torch==2.13.0``,
what the Makefile does): a bare ``torch`` requirement with nothing installed pulls several GB of CUDA packages.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'^VERSION = "(.+)"$', (Path(__file__).parent / "lmforge_common.py").read_text(), re.M).group(1)  # type: ignore[union-attr]

setup(
    name="lmforge",
    version=VERSION,
    description="Arrow-backed DeepSpeed ZeRO pretraining for causal and masked LMs, with tokenizer training and Hugging Face export",
    python_requires=">=3.10",
    packages=find_packages(include=["lmforge", "data_prep", "data_prep.*", "pretrain", "pretrain.*", "launch", "launch.*"]),
    py_modules=["lmforge_common"],
    package_data={"pretrain": ["configs/*.yaml"]},
    install_requires=[
        # Capped at the minor versions the suite was last run with (torch 2.13, DeepSpeed 0.19, transformers 5.24,
        # tokenizers 0.23, datasets 5.2): the export reads DeepSpeed's checkpoint layout and pickled classes, and the
        # verification compares logits bit for bit. Raise a cap after the suite passes on the newer release.
        "torch>=2.4,<2.14",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.46,<5.25",
        "datasets>=3.0,<5.3",
        "pyarrow>=15",
        "tokenizers>=0.20,<0.24",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "pydantic>=2.6,<3",  # config type checks (pretrain.config_check): dataclass config, coerce_numbers_to_str
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "numpy>=1.26",
        "zstandard>=0.22",
        "huggingface_hub>=0.25",
        "xxhash>=3",  # checkpoint file checksums (pretrain.integrity)
        "accelerate>=1.1",  # transformers' HfDeepSpeedConfig (ZeRO-3 partitioned model construction) needs it
        "matplotlib>=3.7",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=8", "mpi4py>=3.1", "lm-eval>=0.4.13,<0.5", "ruff>=0.17,<0.18", "mypy>=2.4,<2.5",
                 "datatrove>=0.10,<0.11"],  # make lint runs ruff and mypy
        "eval": ["lm-eval>=0.4.13,<0.5"],  # lmforge eval / export --eval-tasks (lm-evaluation-harness)
        # accelerate: the HF Trainer peer of bench_train; datatrove (its JsonlReader needs orjson): a bench_prep peer
        "bench": ["psutil>=5.9", "accelerate>=1.0", "datatrove>=0.10,<0.11", "orjson>=3"],
        # Liger-Kernel for the HF Trainer peer of bench/gpu_mfu.py (use_liger_kernel=True). It requires triton, i.e. a
        # CUDA machine, so CPU installs, `make bench` and CI never install this extra; 0.8 needs transformers >= 5.
        "gpu-bench": ["liger-kernel>=0.8,<0.9"],
        "dedup": ["datatrove>=0.10,<0.11"],  # prep --near-dedup (MinHash): the core install, sha1 hashing, no spaCy/nltk
    },
    entry_points={"console_scripts": ["lmforge=lmforge.cli:entry"]},
)
