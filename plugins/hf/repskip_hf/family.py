"""Family plugin for every decoder-only causal LM the installed transformers ships.

Nothing here names an architecture: the layout (where the decoder layers are, every tensor's
name and shape, what each layer is) comes from the model transformers builds for the config
on the meta device (layout.py), the config rewrite for kept layers is checked against the
same (layer_config.py), and the model runs on transformers' own code.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from repskip.errors import RepskipError
from repskip.family import Family
from repskip.flops import ModelCost

from . import layer_config, residual
from .cost import model_cost
from . import layout as _layout


# config keys a tensor dimension may follow, for naming them in a shape mismatch
SHAPE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "num_attention_heads",
              "n_head", "num_key_value_heads", "head_dim", "moe_intermediate_size", "shared_expert_intermediate_size",
              "num_experts", "num_local_experts", "n_routed_experts", "kv_lora_rank", "q_lora_rank")


class HFDecoderFamily(Family):
    supports = "every decoder-only causal LM of the installed transformers (docs/architectures.md lists what was tested)"
    generative_kind = "autoregressive"
    default_sampler = "ar"
    generic = True  # the other families' model types go to them first

    def tested_model_types(self) -> dict[str, dict[str, str]]:
        """tested.json: what tests/architectures.py measured, model type by model type."""
        import json

        record = json.loads((Path(__file__).parent / "tested.json").read_text())
        return record["types"]

    def matches(self, config: dict) -> bool:
        """Any model type transformers knows, and any checkpoint that ships a causal LM of its
        own (which runs only with --trust-remote-code)."""
        auto = config.get("auto_map")
        return (_layout.config_class(str(config.get("model_type", ""))) is not None
                or isinstance(auto, dict) and "AutoModelForCausalLM" in auto)

    #: the folder of a checkpoint whose own modeling code is trusted (--trust-remote-code)
    code: str | None = None

    def for_checkpoint(self, path: Path, trust_remote_code: bool) -> HFDecoderFamily:
        if not trust_remote_code:
            return self
        bound = type(self)()
        bound.code = str(path)
        return bound

    def _layout(self, config: dict) -> _layout.Layout:
        return _layout.layout(config, self.code)

    def num_layers(self, config: dict) -> int:
        problem = _layout.kind_problem(config, self.code)
        if problem:
            raise RepskipError(problem)
        return _layout.count_of(config, self.code)

    def layer_prefix(self, config: dict) -> str:
        return self._layout(config).prefix

    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        return layer_config.rewrite(config, kept, self.code)

    def cost(self, config: dict) -> ModelCost:
        lo = self._layout(config)
        model = _layout.meta_model(config, self.code)
        return model_cost(model, _layout._get(model, lo.layers_path))

    def hidden_size(self, config: dict) -> int:
        return int(_layout.build_config(config, self.code).hidden_size)

    def vocab_size(self, config: dict) -> int:
        return int(_layout.build_config(config, self.code).vocab_size)

    # --- consistency of config.json and weights -----------------------------------------------
    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        """What ``save_pretrained`` writes for this config (None for a quantized checkpoint,
        whose names and shapes are the quantizer's)."""
        if config.get("quantization_config"):
            return None
        return self._layout(config).saved

    def tensor_layouts(self, config: dict) -> list[dict[str, tuple[int, ...]]]:
        """Both forms transformers loads: as it saves, and as its modules name the tensors
        (a fused-experts checkpoint, say)."""
        if config.get("quantization_config"):
            return []
        lo = self._layout(config)
        return [lo.saved] + ([lo.native] if lo.native != lo.saved else [])

    def optional_tensors(self, config: dict) -> dict[str, tuple[int, ...] | None]:
        """Tied tensors saved anyway (transformers ties them on load) and the rotary
        inv_freq buffers older saves hold (recomputed, never read)."""
        lo = self._layout(config)
        out: dict[str, tuple[int, ...] | None] = {}
        for name, target in lo.tied.items():
            out[name] = lo.native.get(name) or lo.native.get(target)
        for name in list(lo.saved) + list(lo.native):
            if name.endswith(".weight") and (".self_attn." in name or ".attention." in name):
                out.setdefault(name.rsplit(".", 2)[0] + ".rotary_emb.inv_freq", None)
        out.setdefault("model.rotary_emb.inv_freq", None)
        return out

    def tolerated_tensor(self, config: dict, name: str) -> bool:
        return self._layout(config).is_ignored(name)

    def shape_sources(self, config: dict, name: str) -> tuple[str, ...] | None:
        """Which config keys each dimension of ``name`` follows, found by asking transformers
        to build the model again with one key doubled at a time (only when a message needs
        it). A key config.json leaves out is named with the default transformers filled in."""
        lo = self._layout(config)
        table = lo.saved if name in lo.saved else lo.native
        if name not in table:
            return None
        shape = table[name]
        filled = _layout.build_config(config, self.code)
        sources: list[list[str]] = [[] for _ in shape]
        for key in SHAPE_KEYS:
            value = config.get(key, getattr(filled, key, None) if key not in config else None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                continue
            try:
                other = self._layout({**config, key: 2 * value})
            except RepskipError:
                continue
            changed = (other.saved if name in lo.saved else other.native).get(name)
            if changed is not None and len(changed) == len(shape):
                label = key if key in config else f"{key}, absent from config.json: default {value}"
                for i, (a, b) in enumerate(zip(shape, changed)):
                    if a != b:
                        sources[i].append(label)
        return tuple("*".join(s) for s in sources)

    # --- linear repair -----------------------------------------------------------------------
    def repair_problem(self, config: dict) -> str | None:
        lo = self._layout(config)
        layers = _layout._get(_layout.meta_model(config, self.code), lo.layers_path)
        for layer in layers:
            problem = residual.problem(layer)
            if problem:
                return problem
        return None

    def mlp_output_projection(self, layer: Any) -> Any | None:
        return residual.hook_point(layer)

    def mlp_output_parameters(self, layer: Any) -> list[tuple[Any, int]]:
        return [(layer.get_parameter(w.name), w.axis) for w in residual.writers(layer) or []]

    def mlp_output_tensors(self, config: dict, index: int, names: Collection[str]) -> list[tuple[str, int]]:
        """The writers of layer ``index``'s MLP output under the names this checkpoint uses:
        the modules' own (a checkpoint saved as transformers names them in memory) or as
        ``save_pretrained`` writes them, where transformers' checkpoint conversion splits a
        fused experts tensor into one per expert (the output axis then loses the experts one)."""
        lo = self._layout(config)
        model = _layout.meta_model(config, self.code)
        prefix = f"{lo.layers_path}.{index}."
        found = residual.writers(_layout._get(model, lo.layers_path)[index]) or []
        own = [(prefix + w.name, w.axis) for w in found]
        if own and all(name in names for name, _ in own):
            return own
        from transformers.core_model_loading import revert_weight_conversion

        out = []
        for name, axis in own:
            param = model.get_parameter(name)
            for disk, tensor in revert_weight_conversion(model, {name: param}).items():
                shape, full = tuple(tensor.shape), tuple(param.shape)
                if shape == full:
                    out.append((disk, axis))
                elif axis >= 1 and shape == full[1:]:
                    out.append((disk, axis - 1))  # one tensor per expert
                else:
                    raise RepskipError(f"cannot tell the output axis of {disk} {list(shape)} (stored from {name} "
                                       f"{list(full)}); this checkpoint cannot take a linear repair")
        return out

    def disk_tensors(self, config: dict, name: str, value: Any, names: Collection[str]) -> dict[str, Any]:
        """A trained parameter as the checkpoint stores it: under its own name, or through
        transformers' checkpoint conversion reverted (fused experts split per expert, say)."""
        if name in names:
            return {name: value}
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(_layout.meta_model(config, self.code), {name: value}))

    # --- models --------------------------------------------------------------------------------
    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | dict | None = None,
             offload_folder: Path | None = None, max_memory: dict | None = None) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=self.code is not None,
            use_safetensors=True,
            device_map=device_map,  # accelerate places the layers across devices
            **({"offload_folder": str(offload_folder)} if offload_folder is not None else {}),
            **({"max_memory": max_memory} if max_memory is not None else {}),  # beyond it: the offload folder
        )
        return (model if device_map else model.to(device)).eval()

    def empty(self, config: dict) -> Any:
        """The causal LM transformers builds for ``config``, on the meta device."""
        return _layout.fresh_meta_model(config, self.code)

    def layerwise_device_map(self, config: dict, device: str) -> dict[str, str]:
        """Every decoder layer, the input embeddings and the LM head on "disk" (accelerate
        reads them from the checkpoint as they run), everything else on ``device``."""
        model = _layout.meta_model(config, self.code)
        path = _layout.layout(config, self.code).layers_path
        streamed = {_module_name(model, model.get_input_embeddings())}
        if model.get_output_embeddings() is not None:
            streamed.add(_module_name(model, model.get_output_embeddings()))
        placed: dict[str, str] = {}
        module, prefix = model, ""
        for part in path.split("."):
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                placed[prefix + name] = device
            for name, _ in module.named_children():
                if name != part:
                    placed[prefix + name] = "disk" if prefix + name in streamed else device
            module, prefix = getattr(module, part), f"{prefix}{part}."
        placed.update({f"{prefix}{i}": "disk" for i in range(len(module))})
        return placed  # embeddings nested deeper than the layers' parent stay with theirs, on the device

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=self.code is not None)

    def decoder_layers(self, model: Any) -> Any:
        return _layout._get(model, self._layers_path(model))

    @staticmethod
    def _layers_path(model: Any) -> str:
        path = getattr(model, "_repskip_layers_path", None)
        if path is None:
            path = _layout.layers_path(model, int(getattr(model.config, _layout.COUNT_ATTRIBUTE)))
            model._repskip_layers_path = path
        return path

    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        """Keep the ``kept`` layers of a loaded model, in place, and set every plain setting of
        every module (a layer's index, its window, a map from layer indices to shared blocks,
        the config) to what transformers sets for the rewritten config: the model then computes
        what the compressed checkpoint computes."""
        import torch  # here, not at the top: working on files must not need torch

        path = self._layers_path(model)
        parent_path, _, name = path.rpartition(".")
        parent = _layout._get(model, parent_path) if parent_path else model
        layers = getattr(parent, name)
        new_config = self.rewrite_config(_config_dict(model.config), kept)
        setattr(parent, name, torch.nn.ModuleList(layers[i] for i in kept))
        old = _config_dict(model.config)  # every module holds this one config object: change it in place
        for key, value in new_config.items():
            if old.get(key) != value:
                setattr(model.config, key, value)
        built = dict(_layout.meta_model(new_config, self.code).named_modules())
        for module_name, module in model.named_modules():
            twin = built.get(module_name)
            if twin is None or type(twin) is not type(module):
                continue
            for key, value in vars(twin).items():
                if key.startswith("_") or key == "training" or not _layout.plain(value):
                    continue
                if key not in vars(module) or vars(module)[key] != value:
                    setattr(module, key, value)

    def onnx_module(self, model: Any) -> Any:
        from .onnx import CausalLMWithPast

        return CausalLMWithPast(model)


def _config_dict(config: Any) -> dict:
    """A loaded model's config as config.json holds it."""
    import json

    return json.loads(config.to_json_string(use_diff=False))


def _module_name(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module)
