"""What LLaDA and Dream share as families: one decoder implementation, a mask token, and
logits that may need realigning so that position i predicts token i."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from repskip.errors import RepskipError
from repskip.family import Dim, Family
from repskip.flops import DecoderGeometry

from .spec import DecoderSpec

# torch and the model code are imported where a model is built or run, not here: finding a
# checkpoint's family and compressing its files must not need them.


def rope_theta(config: dict) -> float:
    """RoPE base: a top-level key in the authors' configs, under rope_parameters in newer saves."""
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


class DiffusionFamily(Family):
    generative_kind = "diffusion"
    training_objective = "masked-diffusion"
    #: True when logits[:, i] predicts token i+1 (Dream, from its AR initialisation).
    shifted_logits: ClassVar[bool] = False
    #: internal parameter name pattern -> on-disk name template, for the per-layer tensors
    layer_names: ClassVar[dict[str, str]] = {}
    #: internal -> on-disk names of the tensors outside the layers
    top_names: ClassVar[dict[str, str]] = {}
    #: config keys that give the context length, first found wins
    context_keys: ClassVar[tuple[str, ...]] = ("max_position_embeddings",)

    #: the model type this family reads (config.json's model_type)
    model_type: ClassVar[str] = ""

    def tested_model_types(self) -> dict[str, dict[str, str]]:
        """Every check passes on the tiny LLaDA and Dream checkpoints: tests/test_diffusion_families.py,
        test_repair.py, test_onnx.py and test_heal.py."""
        return {self.model_type: dict.fromkeys(("analyze", "compress", "repair", "onnx", "heal"), "ok")}

    # --- what each family says about its config ---------------------------------------
    def spec(self, config: dict) -> DecoderSpec:
        raise NotImplementedError

    def mask_token_id(self, config: dict) -> int:
        value = config.get("mask_token_id")
        if value is None:
            raise RepskipError(
                "config.json has no mask_token_id: a masked-diffusion model needs one; add it "
                "to config.json"
            )
        vocab = self.spec(config).vocab
        if not 0 <= int(value) < vocab:
            raise RepskipError(f"mask_token_id {value} is outside the vocabulary (size {vocab})")
        return int(value)

    def spec_sources(self, config: dict) -> dict[str, str]:
        """DecoderSpec field -> the config.json key(s) it is read from, for error messages."""
        return {}

    # --- shared behaviour ---------------------------------------------------------------
    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        """Exactly the tensors the loader (model.load_decoder) fills, on-disk names: it uses
        every one and refuses any other, so none is optional."""
        s = self.spec(config)
        src = {"hidden": "hidden", "heads": "heads", "kv_heads": "kv_heads", "head_dim": "head_dim",
               "intermediate": "intermediate", "vocab": "vocab", **self.spec_sources(config)}
        hidden, vocab = Dim(s.hidden, src["hidden"]), Dim(s.vocab, src["vocab"])
        inter = Dim(s.intermediate, src["intermediate"])
        q = Dim(s.heads * s.head_dim, f"{src['heads']}*{src['head_dim']}")
        kv = Dim(s.kv_heads * s.head_dim, f"{src['kv_heads']}*{src['head_dim']}")
        layer = {
            "attn_norm.weight": (hidden,),
            "attn.q_proj.weight": (q, hidden),
            "attn.k_proj.weight": (kv, hidden),
            "attn.v_proj.weight": (kv, hidden),
            **({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)} if s.qkv_bias else {}),
            "attn.o_proj.weight": (hidden, q),
            "mlp_norm.weight": (hidden,),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        out = {self.disk_name("embed.weight"): (vocab, hidden)}
        for i in range(s.layers):
            out.update({self.disk_name(f"blocks.{i}.{name}"): shape for name, shape in layer.items()})
        out[self.disk_name("norm.weight")] = (hidden,)
        if not s.tie_embeddings:
            out[self.disk_name("lm_head.weight")] = (vocab, hidden)
        return out

    def disk_name(self, name: str) -> str:
        if name in self.top_names:
            return self.top_names[name]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None or m.group(2) not in self.layer_names:
            raise KeyError(name)
        return self.layer_names[m.group(2)].format(i=m.group(1))

    def parameter_tensor(self, config: dict, name: str) -> str:
        return self.disk_name(name)

    def mlp_output_projection(self, layer: Any) -> Any:
        return layer.mlp.down_proj

    def mlp_output_tensor(self, config: dict, index: int) -> str:
        return self.layer_names["mlp.down_proj.weight"].format(i=index)

    def geometry(self, config: dict) -> DecoderGeometry:
        s = self.spec(config)
        return DecoderGeometry(s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, s.layers)

    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | dict | None = None,
             offload_folder: Path | None = None) -> Any:
        from repskip.checkpoint import read_config

        from .model import layerwise_device_map, load_decoder

        config = read_config(path)
        streamed = device_map is not None and device_map == layerwise_device_map(self.spec(config), device)
        if device_map and not streamed:
            raise RepskipError(f"{type(self).__name__} loads onto one device; drop --device-map and pass --device")
        model = load_decoder(path, self.spec(config), self.disk_name, dtype, device,
                             offload_folder=offload_folder if streamed else None)
        model.repskip_config = config  # samplers read the mask token and context from it
        return model

    def empty(self, config: dict) -> Any:
        """The decoder ``load`` builds, on the meta device."""
        import torch

        from .model import BidirectionalDecoder

        with torch.device("meta"):
            model = BidirectionalDecoder(self.spec(config))
        model.repskip_config = config
        return model.eval()

    def layerwise_device_map(self, config: dict, device: str) -> dict[str, str]:
        """Every block on "disk", the rest on ``device`` (see repskip.engine.offload)."""
        from .model import layerwise_device_map

        return layerwise_device_map(self.spec(config), device)

    def context_length(self, config: dict) -> int | None:
        """Longest sequence the model was trained for, when the config says."""
        for key in self.context_keys:
            if config.get(key):
                return int(config[key])
        return None

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        # AutoTokenizer reads config.json, whose model type transformers does not know, and warns
        # that the model may not be compatible: true, and beside the point for a tokenizer
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (ValueError, OSError, ImportError):
            # The authors' tokenizer classes are remote code; tokenizer.json is all we need.
            if (Path(path) / "tokenizer.json").is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"))
            raise RepskipError(f"{path} has no tokenizer that loads without remote code (no tokenizer.json)") from None
        finally:
            hf_logging.set_verbosity(level)

    def decoder_layers(self, model: Any) -> Any:
        return model.blocks

    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        import torch

        model.blocks = torch.nn.ModuleList(model.blocks[i] for i in kept)
        spec = model.spec
        model.spec = DecoderSpec(**{**spec.__dict__, "layers": len(kept)})

    def onnx_module(self, model: Any) -> Any:
        from .model import ExportForward

        return ExportForward(model)

    def logits(self, model: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Raw logits of the forward pass, as the authors' model returns them."""
        return model(input_ids, attention_mask)

    def token_logits(self, model: Any, input_ids: Any, attention_mask: Any = None,
                     window: tuple[int, int] | None = None) -> Any:
        """Logits aligned so that position i predicts the token at position i; with
        ``window=(start, end)``, for those positions only."""
        import torch

        if window is None:
            logits = model(input_ids, attention_mask)
            if self.shifted_logits:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            return logits
        start, end = window
        if not self.shifted_logits:
            return model(input_ids, attention_mask, head_window=(start, end))
        # shifted: position i is predicted by hidden state i - 1 (position 0 by itself)
        logits = model(input_ids, attention_mask, head_window=(max(start - 1, 0), end - 1))
        return torch.cat([logits[:, :1], logits], dim=1) if start == 0 else logits
