"""megatron_lcl: Latent Compression Learning pre-training on megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup


def package_version() -> str:
    """`__version__` of megatron_lcl/__init__.py, the one place the version is written (read as text:
    importing the package needs its dependencies)."""
    text = (Path(__file__).parent / "megatron_lcl" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


setup(
    name="megatron_lcl",
    version=package_version(),
    description="Vision-encoder pre-training on interleaved image-text data via Latent "
    "Compression Learning, on megatron-core (tensor x pipeline x data parallel).",
    packages=find_packages(include=["megatron_lcl", "megatron_lcl.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned: cluster users bring their own CUDA build.
    install_requires=[
        "torch>=2.4",
        # tested: 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12: `make test-mcore-latest`); version
        # differences in runtime/mcore_compat.py, see README "Upgrading megatron-core"
        "megatron-core>=0.16.1,<0.20",
        "sentencepiece>=0.2",
        "protobuf",
        "webdataset>=0.2.100",
        "tensorboard",
        "psutil",  # required by megatron-core dist-checkpointing (save hangs without it)
        "numpy",
        "scipy",  # scaling fits: E(C) = a (C + b)^c + d, crossovers
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "transformers>=4.45",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "pyarrow", "pycocoevalcap>=1.2"],
        "eval": ["pycocoevalcap>=1.2"],  # CIDEr / BLEU of captioning transfer (its PTB tokenizer needs Java)
        "obelics": ["pyarrow"],  # OBELICS parquet shards
        "gpu": ["transformer-engine[pytorch]>=1.12"],
        # NVIDIA Apex has no extra: it is built from github.com/NVIDIA/apex against the node's CUDA
        # (docs/gpu.md); PyPI's `apex` is an unrelated package.
    },
    entry_points={
        "console_scripts": [
            "lcl-train = megatron_lcl.train:run",
            "lcl-prepare-data = megatron_lcl.data.prepare:main",
            "lcl-train-tokenizer = megatron_lcl.data.build_tokenizer:main",
            "lcl-convert-to-hf = megatron_lcl.hf.export:main",
            "lcl-convert-from-hf = megatron_lcl.hf.from_hf:main",
            "lcl-verify-hf = megatron_lcl.hf.verify:main",
            "lcl-eval-classify = megatron_lcl.eval.classify:main",
            "lcl-eval-retrieve = megatron_lcl.eval.retrieve:main",
            "lcl-eval-caption = megatron_lcl.eval.caption:main",
            "lcl-eval-dialogue = megatron_lcl.eval.dialogue.task:main",
            "lcl-sweep = megatron_lcl.scaling.run_sweep:main",
            "lcl-scaling-report = megatron_lcl.scaling.report:main",
        ],
    },
)
