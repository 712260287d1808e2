"""What a model family plugin must do, and how the core finds the family of a checkpoint.

A family is registered under the ``repskip.families`` entry-point group. The core knows no
family by name: it asks each registered family whether it recognises a config.json.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import registry
from .errors import RepskipError
from .flops import DecoderGeometry, ModelCost

GenerativeKind = Literal["autoregressive", "diffusion"]


class Dim(int):
    """A tensor dimension that remembers where in config.json it comes from.

    ``Dim(64, "hidden_size")`` or ``Dim(256, "num_key_value_heads*head_dim")`` is the int 64 or
    256 everywhere (shapes built from Dims compare equal to plain tuples); ``source`` lets a
    shape mismatch say which config key to fix.
    """

    source: str

    def __new__(cls, value: int, source: str) -> Dim:
        obj = super().__new__(cls, int(value))
        obj.source = source
        return obj

    def __getnewargs__(self) -> tuple[int, str]:
        return int(self), self.source

    def __repr__(self) -> str:
        return int.__repr__(self)

    __str__ = __repr__


class Family(abc.ABC):
    """A family of checkpoints that share an on-disk layout and a forward semantics.

    Subclasses set the class attributes and implement the abstract methods. Everything a
    family does with files works on the config dict; everything it does with a model works
    on the torch module its ``load`` returns.
    """

    #: Human-readable list of what the family covers, shown when nothing matches.
    supports: ClassVar[str] = ""
    #: "autoregressive" or "diffusion": decides samplers and analysis modes.
    generative_kind: ClassVar[GenerativeKind] = "autoregressive"
    #: Name of the sampler plugin used when the user names none.
    default_sampler: ClassVar[str] = "ar"
    #: Name of the training objective plugin (``repskip.objectives``) that heals its models.
    training_objective: ClassVar[str] = "causal-lm"
    #: A family that serves whatever a library knows (transformers' every decoder) is asked
    #: after the families that claim model types of their own.
    generic: ClassVar[bool] = False

    def for_checkpoint(self, path: Path, trust_remote_code: bool) -> Family:
        """The family bound to one checkpoint folder: a family that can run a checkpoint's own
        modeling code does so only when ``trust_remote_code`` is given (as transformers does);
        the default ignores both and returns itself."""
        return self

    def tested_model_types(self) -> dict[str, dict[str, str]]:
        """What ``repskip plugins --models`` lists, per model type: check (analyze, compress,
        repair, onnx, heal) -> "ok" or why not, as the family's tests measured it."""
        return {}

    # --- files -----------------------------------------------------------------------
    @abc.abstractmethod
    def matches(self, config: dict) -> bool:
        """Whether this family handles a checkpoint with this config.json."""

    @abc.abstractmethod
    def num_layers(self, config: dict) -> int:
        """Number of decoder layers the config declares."""

    @abc.abstractmethod
    def layer_prefix(self, config: dict) -> str:
        """Tensor-name prefix of the layers: layer i's tensors start with f"{prefix}{i}."."""

    @abc.abstractmethod
    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        """A new config dict for a model that keeps only the layers ``kept`` (old indices)."""

    def geometry(self, config: dict) -> DecoderGeometry:
        """The shapes of a decoder whose layers are all alike, where a family can give them;
        the defaults of ``cost``, ``hidden_size`` and ``vocab_size`` read them."""
        raise RepskipError(f"the {type(self).__name__} family plugin gives no decoder geometry")

    def cost(self, config: dict) -> ModelCost:
        """Per-layer multiply-accumulates, for the analytic FLOPs (repskip.flops)."""
        return self.geometry(config).cost()

    def hidden_size(self, config: dict) -> int:
        """The width of the residual stream (the size of a repair map)."""
        return self.geometry(config).hidden

    def vocab_size(self, config: dict) -> int:
        return self.geometry(config).vocab

    # --- models ----------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | None = None) -> Any:
        """Load the model for inference (eval mode). ``dtype=None`` keeps the checkpoint's.
        ``device_map`` (e.g. "auto") spreads a model too big for one device, where the family
        can; a family that cannot raises RepskipError."""

    def empty(self, config: dict) -> Any | None:
        """The model ``load`` returns for ``config``, built on the meta device with no weights
        (a sharded heal fills it from the main process's copy), or None where the family cannot
        build one: then every process of a sharded heal reads the checkpoint itself."""
        return None

    @abc.abstractmethod
    def load_tokenizer(self, path: Path) -> Any:
        """The tokenizer saved with the checkpoint."""

    @abc.abstractmethod
    def decoder_layers(self, model: Any) -> Any:
        """The ordered torch.nn.ModuleList of decoder layers."""

    @abc.abstractmethod
    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        """Keep only ``kept`` layers, in place, leaving a model that runs (caches included)."""

    def logits(self, model: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Logits of a forward pass; position i predicts token i+1 for autoregressive models.
        No KV cache: nothing reuses it, and a layer run twice on recorded arguments
        (repskip.engine.layerwise) must not find its own keys from the first run."""
        cache = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **cache).logits

    def onnx_module(self, model: Any) -> Any:
        """A torch module with the ONNX signature of this family's kind, for export.

        Autoregressive: ``forward(input_ids, attention_mask, position_ids, past)`` where
        ``past`` is a tuple of 2 x layers tensors [batch, kv_heads, past_len, head_dim] (key,
        value per layer), returning ``(logits, *present)`` with the new token's keys and values
        appended. Diffusion: ``forward(input_ids, attention_mask)`` returning the logits as the
        family's own forward returns them. See repskip.runtime for the names each gets.
        """
        raise RepskipError(f"the {type(self).__name__} family plugin does not support ONNX export")

    @staticmethod
    def layer_output(output: Any) -> Any:
        """The hidden state a decoder layer returns (some return a tuple)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def context_length(self, config: dict) -> int | None:
        """The longest sequence the model was trained for, when config.json says so
        (``max_position_embeddings`` unless a family reads another key); else None."""
        value = config.get("max_position_embeddings")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def parameter_tensor(self, config: dict, name: str) -> str:
        """The on-disk tensor name of the loaded model's parameter ``name`` (as
        ``named_parameters`` gives it), for writing trained weights back; the default is
        the same name."""
        return name

    def disk_tensors(self, config: dict, name: str, value: Any, names: Collection[str]) -> dict[str, Any]:
        """The checkpoint tensors (among ``names``) that hold the loaded model's parameter
        ``name`` with the trained ``value``: one, by ``parameter_tensor``, unless the family
        stores a parameter otherwise (split per expert, say)."""
        return {self.parameter_tensor(config, name): value}

    # --- linear repair (optional) -------------------------------------------------------
    def mlp_output_projection(self, layer: Any) -> Any | None:
        """The module whose output a decoder layer adds to its residual stream after the MLP
        (SwiGLU's down projection, or the whole MLP block): the repair records its output m
        and, while a map T is fitted or checked, replaces it by m T. ``None``, the default,
        means the family does not support repair."""
        return None

    def mlp_output_parameters(self, layer: Any) -> list[tuple[Any, int]]:
        """The parameters a map folds into in a loaded layer, each with its output (hidden)
        axis: m T is then computed by the layer itself. The default is the weight and bias of
        ``mlp_output_projection`` (a ``torch.nn.Linear``, output axis 0)."""
        projection = self.mlp_output_projection(layer)
        if projection is None:
            return []
        return [(p, 0) for p in (projection.weight, projection.bias) if p is not None]

    def mlp_output_tensor(self, config: dict, index: int) -> str | None:
        """The on-disk name of the weight of layer ``index``'s MLP output projection, shaped
        [hidden, intermediate]; a bias, where the checkpoint has one, is the same name ending
        in ``.bias``. ``None``, the default, means the family does not support repair."""
        return None

    def mlp_output_tensors(self, config: dict, index: int, names: Collection[str]) -> list[tuple[str, int]]:
        """The on-disk tensors of layer ``index`` a map folds into, each with its output
        (hidden) axis, among the checkpoint's tensor ``names``. The default is
        ``mlp_output_tensor`` and its bias."""
        weight = self.mlp_output_tensor(config, index)
        if weight is None:
            return []
        bias = weight[: -len(".weight")] + ".bias" if weight.endswith(".weight") else None
        return [(weight, 0)] + ([(bias, 0)] if bias and bias in names else [])

    def repair_problem(self, config: dict) -> str | None:
        """Why a linear repair cannot fold into this model's weights, in words; None when it
        can."""
        if self.mlp_output_tensor(config, 0) is None:
            return f"the {type(self).__name__} family plugin declares no MLP output projection"
        return None

    # --- consistency of config.json and weights (optional) ------------------------------
    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        """Every tensor a checkpoint with this config.json must hold, name -> shape, computed
        from the config alone; ``None`` (the default) when the family cannot say.

        When a dict is returned, opening a checkpoint refuses a tensor that is missing, one
        whose shape differs, and one that is neither here nor in ``optional_tensors``. Shape
        entries may be ``Dim``s (ints that name the config keys they come from) so that a
        mismatch names the key to fix. Raise ``KeyError`` for a config key that is missing.
        """
        return None

    def tensor_layouts(self, config: dict) -> list[dict[str, tuple[int, ...]]]:
        """Every complete set of tensors a checkpoint of this config may hold (a library may
        load two namings of the same weights); the default is ``expected_tensors`` alone.
        A checkpoint is checked against the one it matches best."""
        expected = self.expected_tensors(config)
        return [] if expected is None else [expected]

    def tolerated_tensor(self, config: dict, name: str) -> bool:
        """Whether a tensor outside every layout is one the loader ignores (a legacy buffer
        of any shape); the default is none."""
        return False

    def shape_sources(self, config: dict, name: str) -> tuple[str, ...] | None:
        """The config keys each dimension of tensor ``name`` comes from, for a message that
        says which key to fix; None when the family cannot say (shapes made of ``Dim``s say
        it already)."""
        return None

    def optional_tensors(self, config: dict) -> dict[str, tuple[int, ...] | None]:
        """Tensors that may be present or absent without changing the model (a tied
        ``lm_head.weight``, a legacy ``rotary_emb.inv_freq`` buffer the loader ignores): name ->
        the shape it must have when present, or ``None`` for any shape. Read only when
        ``expected_tensors`` returns a dict."""
        return {}


def slice_layer_config(
    config: dict, kept: Sequence[int], count_key: str, per_layer_keys: Sequence[str] = ("layer_types",)
) -> dict:
    """A config for the kept layers: the count updated, per-layer lists sliced, and
    ``max_window_layers`` (the number of leading full-attention layers) recomputed."""
    new = dict(config)
    total = int(config[count_key])
    new[count_key] = len(kept)
    for key in per_layer_keys:
        values = config.get(key)
        if isinstance(values, list):
            if len(values) != total:
                raise RepskipError(
                    f"config.json {key} has {len(values)} entries for {total} layers; "
                    "the checkpoint is inconsistent"
                )
            new[key] = [values[i] for i in kept]
    # Kept layers keep their order, so the new count is how many were below the old one.
    if isinstance(config.get("max_window_layers"), int):
        new["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return new


def validate_kept(num_layers: int, removed: Sequence[int]) -> list[int]:
    """The kept layer indices for a removal list, with every misuse a clear error."""
    removed = list(removed)
    bad = [i for i in removed if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise RepskipError(f"layer indices must be integers, got {bad[0]!r}")
    out_of_range = sorted(i for i in removed if not 0 <= i < num_layers)
    if out_of_range:
        raise RepskipError(
            f"layer index {out_of_range[0]} is out of range: the model has {num_layers} layers "
            f"(valid indices 0..{num_layers - 1})"
        )
    seen: set[int] = set()
    dupes = sorted({i for i in removed if i in seen or seen.add(i)})
    if dupes:
        raise RepskipError(f"layer index {dupes[0]} is listed more than once in the removal list")
    kept = [i for i in range(num_layers) if i not in seen]
    if not kept:
        raise RepskipError(f"the recipe removes all {num_layers} layers; at least one must stay")
    return kept


def families() -> dict[str, Family]:
    """Instances of every registered family plugin, by entry-point name."""
    return {name: cls() for name, cls in registry.loaded("families").items()}


def find_family(config: dict, name: str | None = None) -> tuple[str, Family]:
    """The family that recognises ``config`` (or the one called ``name``)."""
    available = families()
    if name is not None:
        if name not in available:
            known = ", ".join(sorted(available)) or "none installed"
            raise RepskipError(f"unknown model family {name!r}; installed families: {known}")
        return name, available[name]
    for fam_name, fam in sorted(available.items(), key=lambda item: item[1].generic):
        if fam.matches(config):
            return fam_name, fam
    arch = ", ".join(config.get("architectures") or []) or "?"
    supported = "; ".join(
        f"{n}: {f.supports}" if f.supports else n for n, f in sorted(available.items())
    ) or "no family plugins are installed"
    raise RepskipError(
        f"unsupported architecture (model_type {config.get('model_type')!r}, {arch}). "
        f"Supported: {supported}. To add one, write a family plugin (docs/plugins.md)"
    )
