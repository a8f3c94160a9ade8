"""Packaging for lmforge.

torch is deliberately pinned only loosely: on CPU-only machines install the CPU wheel first
(``pip install torch==2.13.0``, what the Makefile does); a bare ``torch`` requirement with nothing
installed pulls several GB of CUDA packages.
"""
from setuptools import find_packages, setup

setup(
    name="lmforge",
    version="0.1.0",
    description="Arrow-backed DeepSpeed ZeRO pretraining for causal and masked LMs, with tokenizer training and Hugging Face export",
    python_requires=">=3.10",
    packages=find_packages(include=["lmforge", "data_prep", "data_prep.*", "pretrain", "pretrain.*", "launch", "launch.*"]),
    py_modules=["lmforge_common"],
    package_data={"pretrain": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "datasets>=3.0",
        "pyarrow>=15",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "numpy>=1.26",
        "zstandard>=0.22",
        "huggingface_hub>=0.25",
        "accelerate>=1.1",  # transformers' HfDeepSpeedConfig (ZeRO-3 partitioned model construction) needs it
        "matplotlib>=3.7",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=8", "mpi4py>=3.1"],
        "bench": ["psutil>=5.9", "accelerate>=1.0"],  # accelerate: the HF Trainer peer of bench_train
    },
    entry_points={"console_scripts": ["lmforge=lmforge.cli:main"]},
)
