"""repskip models as an lm-evaluation-harness model, so any lm-eval task runs on them.

Importing this module registers the model name ``repskip`` with lm-eval (an optional extra:
``pip install repskip[lm-eval]``)::

    import lm_eval, repskip.verify.lmeval
    lm_eval.simple_evaluate(model="repskip", model_args="pretrained=PATH,recipe=R.yaml", tasks=[...])

or ``repskip lm-eval PATH --recipe R.yaml --tasks TASK``. The model is loaded by its family
plugin, the recipe's repair maps (if any) are folded in and its layers removed in memory, and generation uses the family's sampler
(``sampler_*`` model args set its settings, e.g. ``sampler_steps=64``). Log-likelihoods are
exact next-token sums for autoregressive models and the masked-token Monte Carlo estimate
for diffusion models (``mc_samples`` draws), as their authors evaluate them, on tokens made as
lm-eval's own Hugging Face model makes them (repskip.verify.likelihood.encode_pair).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    from ..errors import RepskipError

    raise RepskipError("the lm-eval adapter needs lm-evaluation-harness: pip install 'repskip[lm-eval]'") from exc

from .likelihood import autoregressive_nll, continuation_logprobs, masked_diffusion_nll
from ..engine.model import open_model
from ..recipe import removed_layers
from ..runtime import model_device
from ..sampler import get_sampler

LENGTH_KEYS = {"ar": "max_new_tokens", "dream": "max_new_tokens", "llada": "gen_length"}


def _value(text: Any) -> Any:
    """model_args arrive as strings from the command line."""
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


# --batch-size auto: requests per forward pass limited by padded tokens, not by count
AUTO_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
AUTO_BATCH_MAX = 256


@register_model("repskip")
class RepskipLM(LM):
    def __init__(self, pretrained: str, recipe: str | None = None, sampler: str | None = None, dtype: str | None = None,
                 device: str = "cpu", batch_size: int | str = 8, mc_samples: int = 16, seed: int = 0,
                 provider: str = "auto", device_map: str | None = None, max_memory: int | str | None = None,
                 offload_folder: str | None = None, **kwargs: Any):
        super().__init__()
        from .. import recipe as recipe_mod
        from ..compress.files import parse_size
        from ..engine.offload import spread_folder

        self.handle = open_model(pretrained, allow_onnx=True)
        self.family = self.handle.family
        if recipe:
            self.handle.require_weights("a recipe applied in memory")
        # a model spread by accelerate: what does not fit max_memory waits in a fresh folder,
        # removed when this object goes (or the process ends)
        budget = parse_size(str(max_memory)) if max_memory is not None else None
        stack = contextlib.ExitStack()
        self._scratch = weakref.finalize(self, stack.close)
        scratch = stack.enter_context(spread_folder(device_map, budget, offload_folder, self.handle.path))
        big = {"offload_folder": scratch, "max_memory": budget} if device_map else {}
        self.model = self.handle.load(_value(dtype), device, device_map=device_map, provider=provider, **big)
        self.removed: list[int] = []
        if recipe:
            loaded = recipe_mod.load(recipe)
            self.removed = removed_layers(loaded, self.handle)
            maps = loaded.repair_maps(self.family.hidden_size(self.handle.ckpt.config))
            if maps:  # a repaired recipe: its maps fold in before the layers go
                from ..repair.fit import fold_in_memory

                fold_in_memory(self.model, self.family, maps)
            kept = [i for i in range(self.handle.num_layers) if i not in set(self.removed)]
            self.family.remove_layers(self.model, kept)
        self.tok = self.family.load_tokenizer(self.handle.path)
        self.sampler_name = sampler or self.family.default_sampler
        self.sampler = get_sampler(self.sampler_name)
        self.sampler_settings = {k[len("sampler_"):]: _value(v) for k, v in kwargs.items() if k.startswith("sampler_")}
        unknown = sorted(k for k in kwargs if not k.startswith("sampler_"))
        if unknown:
            from ..errors import RepskipError

            raise RepskipError(f"repskip lm-eval model has no argument {unknown[0]!r}")
        self.sampler.settings(self.sampler_settings)
        # auto: as many requests per forward pass as fit a padded token budget (by device)
        self.auto_batch = str(batch_size).strip().lower() == "auto"
        self.batch_size = AUTO_BATCH_MAX if self.auto_batch else int(_value(batch_size))
        self.mc_samples = int(_value(mc_samples))
        self.seed = int(_value(seed))
        self.diffusion = self.family.generative_kind == "diffusion"
        self.device_ = model_device(self.model)

    # --- likelihoods ---------------------------------------------------------------------------
    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """lm-eval's tokenization (repskip.verify.likelihood.encode_pair), ``batch_size``
        requests per forward pass."""
        mask_id = self.family.mask_token_id(self.handle.ckpt.config) if self.diffusion else None
        budget = AUTO_BATCH_TOKENS["cuda" if self.device_.type == "cuda" else "cpu"] if self.auto_batch else None
        return continuation_logprobs(self.model, self.family, self.tok, [req.args for req in requests], mask_id=mask_id,
                                     mc_samples=self.mc_samples, seed=self.seed, batch_size=self.batch_size,
                                     max_length=self.family.context_length(self.handle.ckpt.config),
                                     batch_tokens=budget)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = torch.tensor([self._encode(req.args[0], True)], device=self.device_)
            if self.diffusion:
                mask_id = self.family.mask_token_id(self.handle.ckpt.config)
                nll, _ = masked_diffusion_nll(self.model, self.family, ids, mask_id, self.mc_samples, self.seed)
            else:
                nll, _ = autoregressive_nll(self.model, self.family, ids)
            out.append(-nll)
        return out

    # --- generation ------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out: list[str] = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = dict(self.sampler_settings)
            length_key = LENGTH_KEYS.get(self.sampler_name)
            if "max_gen_toks" in gen_kwargs and length_key and length_key not in settings:
                settings[length_key] = int(gen_kwargs["max_gen_toks"])
            if self.diffusion and length_key in settings:  # as the authors: one step per token
                settings.setdefault("steps", settings[length_key])
                if self.sampler_name == "llada" and "block_length" not in settings:
                    settings["block_length"] = 32 if settings[length_key] % 32 == 0 else settings[length_key]
            result = self.sampler.generate(self.model, self.tok, [context], family=self.family, seed=self.seed, **settings)
            text = result.texts[0]
            cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=len(text))
            out.append(text[:cut])
        return out

    @property
    def tokenizer_name(self) -> str:
        return str(self.handle.path)
