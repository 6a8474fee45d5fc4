"""megacpt: a Megatron-style trainer for cross-lingual continual pre-training of LLaMA2 models.

`kernels/` is installed as the subpackage `megacpt.kernels` (never as a top-level `kernels`
module: that name belongs to another PyPI package that transformers probes for).
"""
from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["megacpt", "megacpt.*"])]
packages.append("megacpt.kernels")

setup(
    name="megacpt",
    version="0.1.0",
    description="Megatron-style distributed trainer for cross-lingual continual pre-training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megacpt.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "scipy>=1.10",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "numba>=0.58",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.40", "protobuf", "megatron-core>=0.8",
                 "xxhash>=3.0", "optuna>=3.0", "matplotlib>=3.6", "triton>=3.0", "mpi4py>=3.1",
                 "mpich", "lm-eval>=0.4.2", "accelerate", "wandb>=0.15",
                 "tensorboard>=2.10", "pyarrow>=12", "zstandard>=0.21", "tokenizers>=0.19"],
        "hf": ["transformers>=4.40", "protobuf", "tokenizers>=0.19"],
        "tensorboard": ["tensorboard>=2.10"],
        "xxhash": ["xxhash>=3.0"],
        "triton": ["triton>=3.0"],
        "mpi": ["mpi4py>=3.1", "mpich"],
        "plots": ["matplotlib>=3.6"],
        "optuna": ["optuna>=3.0"],
        "gpu": ["flash-attn"],
        "eval": ["lm-eval>=0.4.2", "transformers>=4.40", "protobuf", "accelerate"],
        "wandb": ["wandb>=0.15"],
        "corpora": ["pyarrow>=12", "zstandard>=0.21"],
    },
    entry_points={
        "console_scripts": [
            "megacpt-train=megacpt.train:cli",
            "megacpt-train-tokenizer=megacpt.data.tokenizer_train:main",
            "megacpt-preprocess=megacpt.data.preprocess:main",
            "megacpt-convert=megacpt.checkpoint.convert:main",
            "megacpt-fit=megacpt.scaling.cli:main",
            "megacpt-evaluate=megacpt.evaluate:main",
            "megacpt-generate=megacpt.generate:main",
        ],
    },
)
