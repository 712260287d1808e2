"""Layer-by-layer, token-by-token statistics of how much each decoder layer changes the
representation, accumulated in streaming form.

Forward hooks on every decoder layer see the raw hidden state entering and leaving it (never
the final-normed entry of ``output_hidden_states``). Each batch's states are reduced to
running sums at once, so memory is bounded by one batch, whatever the number of sequences:
per-layer sums are O(L), the layer x layer similarity matrix O(L^2), the token-distance
profile O(L x max_distance).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import calibration
from ..errors import RepskipError
from ..runtime import model_device
from ..versions import versions

SCHEMA_VERSION = 1
POSITIONS = ("all", "last")


class _StopForward(Exception):
    """Raised by the last layer's hook: nothing after the decoder stack is needed."""


@dataclass
class _GroupSums:
    """Running sums for one group of token positions."""

    num_layers: int
    device: torch.device
    count: int = 0
    cos_sum: torch.Tensor = field(init=False)
    cos_sq_sum: torch.Tensor = field(init=False)
    cos_min: torch.Tensor = field(init=False)
    cos_max: torch.Tensor = field(init=False)
    angle_sum: torch.Tensor = field(init=False)
    gram_sum: torch.Tensor = field(init=False)
    angle_matrix_sum: torch.Tensor = field(init=False)
    matrix_count: int = 0  # tokens behind the matrices (a per-batch sample when capped)

    def __post_init__(self) -> None:
        L, dev = self.num_layers, self.device
        f64 = dict(dtype=torch.float64, device=dev)
        self.cos_sum = torch.zeros(L, **f64)
        self.cos_sq_sum = torch.zeros(L, **f64)
        self.cos_min = torch.full((L,), math.inf, **f64)
        self.cos_max = torch.full((L,), -math.inf, **f64)
        self.angle_sum = torch.zeros(L, **f64)
        self.gram_sum = torch.zeros(L + 1, L + 1, **f64)
        self.angle_matrix_sum = torch.zeros(L + 1, L + 1, **f64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class LayerStatsAccumulator:
    """Streaming statistics over the states h_0 .. h_L of a decoder stack.

    h_0 enters layer 0 and h_{l+1} leaves layer l. For every group of positions (a boolean
    mask per batch) it keeps cos(h_l, h_{l+1}) sums, squares, extremes and angular distance,
    and the full (L+1) x (L+1) mean cosine matrix. Over all real tokens it keeps, per layer
    output, the mean cosine between two tokens of the same sequence as a function of their
    distance (the recency profile).
    """

    def __init__(
        self,
        num_layers: int,
        groups: list[str],
        max_distance: int = 64,
        device: torch.device | str = "cpu",
        matrix_groups: Sequence[str] | None = None,
        angle_groups: Sequence[str] = ("last_token",),
        matrix_tokens: int | None = 2048,
    ):
        self.num_layers = num_layers
        # the layer x layer matrix costs O(L) per layer: keep it for the groups that want it
        self.matrix_groups = set(groups if matrix_groups is None else matrix_groups)
        # the mean angular distance between states needs per-token cosines: few-token groups
        self.angle_groups = set(angle_groups) & self.matrix_groups
        # The matrix keeps a batch's states of every layer at once: (L+1) x tokens x width
        # floats. Past matrix_tokens tokens a batch contributes a seeded random sample to it
        # (the per-layer statistics always use every token).
        self.matrix_tokens = matrix_tokens
        self._sampler = torch.Generator().manual_seed(0)
        self.max_distance = max_distance
        self.device = torch.device(device)
        self.groups = {g: _GroupSums(num_layers, self.device) for g in groups}
        f64 = dict(dtype=torch.float64, device=self.device)
        self.profile_sum = torch.zeros(num_layers, max_distance + 1, **f64)
        self.profile_pairs = torch.zeros(max_distance + 1, **f64)
        self.sequences = 0
        self._batch: dict[str, Any] | None = None

    # --- one batch -------------------------------------------------------------------
    def begin_batch(self, valid: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Start a batch: ``valid`` marks real tokens [B, T]; ``masks`` selects each group.
        Returns the batch's context, which ``resume_batch`` makes current again (a layer-by-layer
        run has every batch open at once)."""
        valid = valid.to(self.device, torch.bool)
        selectors = {}
        picks = {}
        for name in self.groups:
            mask = masks[name].to(self.device, torch.bool) & valid
            selectors[name] = mask
            n = int(mask.sum())
            self.groups[name].count += n
            if name in self.matrix_groups:
                if self.matrix_tokens and n > self.matrix_tokens:
                    picks[name] = torch.randperm(n, generator=self._sampler)[: self.matrix_tokens].sort().values.to(self.device)
                self.groups[name].matrix_count += min(n, self.matrix_tokens or n)
        T = valid.shape[1]
        pos = torch.arange(T, device=self.device)
        dist = pos[:, None] - pos[None, :]  # i - j
        pairs = valid[:, :, None] & valid[:, None, :] & (dist > 0) & (dist <= self.max_distance)
        pair_dist = dist.expand_as(pairs)[pairs]
        self.profile_pairs += torch.bincount(pair_dist, minlength=self.max_distance + 1).double()
        self.sequences += valid.shape[0]
        self._batch = {"sel": selectors, "pairs": pairs, "pair_dist": pair_dist, "units": {}, "picks": picks}
        return self._batch

    def resume_batch(self, context: dict[str, Any]) -> None:
        self._batch = context

    def layer(self, index: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """Take in layer ``index``'s input and output states, [B, T, D] each."""
        batch = self._batch
        if batch is None:
            raise RuntimeError("begin_batch must be called before layer")
        tokens = next(iter(batch["sel"].values())).shape
        if h_in.dim() != 3 or tuple(h_in.shape[:2]) != tuple(tokens) or h_out.shape != h_in.shape:
            raise RepskipError(
                f"cannot measure this model: decoder layer {index} maps hidden states of shape {list(h_in.shape)} "
                f"to {list(h_out.shape)}, not one vector per token of the {list(tokens)} fed in (its layers carry "
                "extra streams or tokens), so the per-token similarity repskip measures is undefined; "
                "compress it with a recipe you write (remove: [...])")
        h_in, h_out = h_in.detach().to(self.device), h_out.detach().to(self.device)
        for name, sums in self.groups.items():
            sel = batch["sel"][name]
            if not bool(sel.any()):
                continue
            u_in, u_out = _unit(h_in[sel]), _unit(h_out[sel])
            cos = (u_in * u_out).sum(-1).clamp(-1.0, 1.0).double()
            sums.cos_sum[index] += cos.sum()
            sums.cos_sq_sum[index] += (cos * cos).sum()
            sums.cos_min[index] = torch.minimum(sums.cos_min[index], cos.min())
            sums.cos_max[index] = torch.maximum(sums.cos_max[index], cos.max())
            sums.angle_sum[index] += (torch.arccos(cos) / math.pi).sum()
            if name not in self.matrix_groups:
                continue
            pick = batch["picks"].get(name)
            if pick is not None:
                u_in, u_out = u_in[pick], u_out[pick]
            # Layer-similarity matrix: the new state against every earlier one. The states
            # of this batch sit in one preallocated buffer, so no step copies earlier ones.
            units = batch["units"].get(name)
            if units is None:
                if index != 0:  # the buffer is filled layer by layer from state 0
                    raise RuntimeError("LayerStatsAccumulator.layer must see layer 0 first in every batch")
                n, width = u_in.shape
                units = batch["units"][name] = torch.empty(self.num_layers + 1, n, width, device=self.device)
                units[0] = u_in
                sums.gram_sum[0, 0] += n
            k = index + 1
            if name in self.angle_groups:
                per_token = torch.einsum("knd,nd->kn", units[:k], u_out).clamp(-1.0, 1.0).double()
                row = per_token.sum(1)
                angles = (torch.arccos(per_token) / math.pi).sum(1)
                sums.angle_matrix_sum[k, :k] += angles
                sums.angle_matrix_sum[:k, k] += angles
            else:
                row = (units[:k].reshape(k, -1) @ u_out.reshape(-1)).double()
            sums.gram_sum[k, :k] += row
            sums.gram_sum[:k, k] += row
            sums.gram_sum[k, k] += u_out.shape[0]
            units[k] = u_out
        # Recency profile of this layer's output over all real tokens.
        u = _unit(h_out)
        gram = u @ u.transpose(1, 2)
        self.profile_sum[index].index_add_(0, batch["pair_dist"], gram[batch["pairs"]].double())

    def end_batch(self) -> None:
        self._batch = None

    # --- results ---------------------------------------------------------------------
    def group_result(self, name: str) -> dict:
        s = self.groups[name]
        if s.count == 0:
            raise RepskipError(f"no token fell in position group {name!r}; nothing to measure")
        n = s.count
        mean = s.cos_sum / n
        var = (s.cos_sq_sum / n - mean * mean).clamp_min(0.0)
        layers = []
        for i in range(self.num_layers):
            layers.append({
                "layer": i,
                "cosine_mean": float(mean[i]),
                "cosine_std": float(var[i].sqrt()),
                "cosine_min": float(s.cos_min[i]),
                "cosine_max": float(s.cos_max[i]),
                "angular_distance_mean": float(s.angle_sum[i] / n),
                "block_influence": float(1.0 - mean[i]),
            })
        out = {"tokens": n, "layers": layers}
        if name in self.matrix_groups:
            out["matrix_tokens"] = s.matrix_count
            matrix = (s.gram_sum / s.matrix_count).clamp(-1.0, 1.0)
            out["similarity_matrix"] = [[round(float(v), 6) for v in row] for row in matrix]
        if name in self.angle_groups:
            angles = s.angle_matrix_sum / s.matrix_count
            out["angular_distance_matrix"] = [[round(float(v), 6) for v in row] for row in angles]
        return out

    def profile_result(self) -> dict:
        pairs = self.profile_pairs[1:]
        sims = self.profile_sum[:, 1:] / pairs.clamp_min(1)
        present = (pairs > 0).tolist()
        return {
            "state": "layer output",
            "distances": [d for d, ok in zip(range(1, self.max_distance + 1), present) if ok],
            "pairs": [int(p) for p, ok in zip(pairs.tolist(), present) if ok],
            "similarity": [
                [round(float(v), 6) for v, ok in zip(row, present) if ok] for row in sims
            ],
        }


@dataclass
class Analysis:
    """The result of an analysis run: a schema-versioned dict with helpers."""

    data: dict

    @property
    def num_layers(self) -> int:
        return int(self.data["model"]["num_layers"])

    @property
    def primary(self) -> str:
        return self.data["primary_group"]

    def layers(self, group: str | None = None) -> list[dict]:
        return self.data["groups"][group or self.primary]["layers"]

    def cosine(self, group: str | None = None) -> list[float]:
        return [row["cosine_mean"] for row in self.layers(group)]

    def block_influence(self, group: str | None = None) -> list[float]:
        return [row["block_influence"] for row in self.layers(group)]

    def matrix(self, group: str | None = None) -> list[list[float]]:
        return self.data["groups"][group or self.primary]["similarity_matrix"]

    def overlay_groups(self) -> list[str]:
        """Groups worth drawing beside the primary one: the last token (AR), each mask ratio
        or each block (diffusion)."""
        names = [g for g in self.data["groups"] if g != self.primary]
        return [g for g in names if g == "last_token" or (g.startswith("masked@") and "@step" not in g)]

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    @classmethod
    def from_dict(cls, data: dict, origin: str = "the analysis") -> "Analysis":
        if not isinstance(data, dict) or data.get("kind") != "repskip.analysis" or "schema_version" not in data:
            raise RepskipError(f"{origin} is not a repskip analysis file (no kind/schema_version)")
        version = data["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RepskipError(
                f"{origin} has schema_version {version!r}; this repskip reads up to {SCHEMA_VERSION}: upgrade repskip"
            )
        problem = _incomplete(data)
        if problem:
            raise RepskipError(f"{origin} is incomplete or damaged ({problem}); re-run 'repskip analyze'")
        return cls(data)


def _incomplete(data: dict) -> str | None:
    """The first thing missing or malformed in an analysis dict that selection relies on."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key in ("model", "calibration", "settings", "groups", "versions"):
        if not isinstance(data.get(key), dict):
            return f"no {key!r} section"
    model = data["model"]
    layers = model.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        return "model.num_layers is missing"
    for key in ("fingerprint", "family"):
        if not isinstance(model.get(key), str):
            return f"model.{key} is missing"
    for key, kind in (("source", str), ("hash", str), ("sequences", int), ("max_length", int)):
        if not isinstance(data["calibration"].get(key), kind):
            return f"calibration.{key} is missing"
    primary = data.get("primary_group")
    if not isinstance(primary, str) or primary not in data["groups"]:
        return "primary_group names no group"
    for name, group in data["groups"].items():
        rows = group.get("layers") if isinstance(group, dict) else None
        if not isinstance(rows, list) or len(rows) != layers:
            return f"groups.{name}.layers does not hold {layers} layers"
        for row in rows:
            if not isinstance(row, dict) or not all(
                number(row.get(k)) for k in ("cosine_mean", "cosine_std", "angular_distance_mean", "block_influence")
            ):
                return f"groups.{name}.layers has an entry without its scores"
        for key in ("similarity_matrix", "angular_distance_matrix"):
            if key in group:
                matrix = group[key]
                if (not isinstance(matrix, list) or len(matrix) != layers + 1
                        or not all(isinstance(r, list) and len(r) == layers + 1 and all(map(number, r)) for r in matrix)):
                    return f"groups.{name}.{key} is not {layers + 1} x {layers + 1} numbers"
    return None


def position_masks(valid: torch.Tensor, positions: str) -> dict[str, torch.Tensor]:
    """The groups every AR analysis measures: the chosen positions and the last real token."""
    last = torch.zeros_like(valid, dtype=torch.bool)
    last[torch.arange(valid.shape[0]), valid.long().sum(1) - 1] = True
    tokens = valid.bool() if positions == "all" else last
    return {"tokens": tokens, "last_token": last}


#: (input_ids, valid) -> (input_ids to run, {group: positions}) for one batch
Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


def masked_sweep(
    mask_id: int, ratios: Sequence[float], prompt_fraction: float = 0.5, seed: int = 0
) -> tuple[list[str], list[Prepare]]:
    """Diffusion analysis under masking: per sequence, the first ``prompt_fraction`` of the
    real tokens stays visible (the prompt); of the rest (the response), a fraction ``ratio``
    chosen at random is replaced by the mask token. Groups: ``masked``, ``prompt`` and
    ``visible`` (unmasked response) over the whole sweep, and ``masked@r`` per ratio."""
    generator = torch.Generator().manual_seed(seed)

    def make(ratio: float) -> Prepare:
        def prepare(ids: torch.Tensor, valid: torch.Tensor):
            lengths = valid.sum(1)
            pos = torch.arange(ids.shape[1])[None, :]
            prompt = valid & (pos < (lengths[:, None] * prompt_fraction).ceil().long())
            response = valid & ~prompt
            draw = torch.rand(ids.shape, generator=generator)
            masked = response & (draw < ratio)
            # every row masks at least one response token, so each ratio is measured
            first = torch.where(response.any(1), response.float().argmax(1), torch.zeros_like(lengths))
            masked[torch.arange(ids.shape[0]), first] |= response[torch.arange(ids.shape[0]), first]
            run_ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
            groups = {"masked": masked, "prompt": prompt, "visible": response & ~masked}
            groups.update({f"masked@{r:g}": masked if r == ratio else torch.zeros_like(masked) for r in ratios})
            return run_ids, groups

        return prepare

    names = ["masked", "prompt", "visible", *(f"masked@{r:g}" for r in ratios)]
    return names, [make(r) for r in ratios]


def _hook_layers(model: Any, family: Any, acc: "LayerStatsAccumulator", stop_after_last: bool) -> list:
    layers = family.decoder_layers(model)
    last = len(layers) - 1

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            acc.layer(index, h_in, family.layer_output(output))
            if stop_after_last and index == last:
                raise _StopForward

        return hook

    return [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]


@torch.inference_mode()
def collect(
    model: Any,
    family: Any,
    calib: calibration.CalibrationSet,
    *,
    pad_id: int,
    batch_size: int = 8,
    positions: str = "all",
    max_distance: int = 64,
    groups: Sequence[str] | None = None,
    prepares: Sequence[Prepare] | None = None,
    matrix_groups: Sequence[str] | None = None,
    matrix_tokens: int | None = 2048,
    progress: Callable[[int, int], None] | None = None,
    layerwise: bool = False,
) -> LayerStatsAccumulator:
    """Run the calibration batches through ``model`` with hooks and return the sums.
    ``layerwise``: one decoder layer at a time over every batch (the same sums; see repskip.engine.layerwise).

    Each function of ``prepares`` is one pass over the calibration set (a mask ratio, say):
    it may change the input ids and says which positions form each of ``groups``. By
    default there is one pass, unchanged, with the groups ``tokens`` (as ``positions``
    says) and ``last_token``.
    """
    if positions not in POSITIONS:
        raise RepskipError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    if prepares is None:
        groups = ["tokens", "last_token"]
        prepares = [lambda ids, valid: (ids, position_masks(valid, positions))]
    L = len(family.decoder_layers(model))
    device = model_device(model)
    acc = LayerStatsAccumulator(L, list(groups), max_distance=max_distance, device=device,
                                matrix_groups=matrix_groups, matrix_tokens=matrix_tokens)
    total = len(calib.sequences) * len(prepares)
    if progress:
        progress(0, total)  # the size of the work, before the first batch takes its time
    if layerwise:
        _collect_layerwise(model, family, acc, calib, pad_id, batch_size, prepares, device, progress, total)
        return acc
    handles = _hook_layers(model, family, acc, stop_after_last=True)
    done = 0
    try:
        for prepare in prepares:
            for ids, mask in calibration.batches(calib.sequences, batch_size, pad_id):
                valid = mask.bool()
                run_ids, masks = prepare(ids, valid)
                acc.begin_batch(valid, masks)
                try:
                    family.logits(model, run_ids.to(device), mask.to(device))
                except _StopForward:
                    pass
                acc.end_batch()
                done += ids.shape[0]
                if progress:
                    progress(done, total)
    finally:
        for h in handles:
            h.remove()
    return acc


def _collect_layerwise(model, family, acc, calib, pad_id, batch_size, prepares, device, progress, total) -> None:
    from ..engine import layerwise

    contexts, forwards = [], []
    for prepare in prepares:
        for ids, mask in calibration.batches(calib.sequences, batch_size, pad_id):
            valid = mask.bool()
            run_ids, masks = prepare(ids, valid)
            contexts.append(acc.begin_batch(valid, masks))
            forwards.append(lambda i=run_ids, m=mask: family.logits(model, i.to(device), m.to(device)))
    sizes = [int(c["pairs"].shape[0]) for c in contexts]
    count = len(family.decoder_layers(model))

    def on_layer(index: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        acc.resume_batch(contexts[batch])
        acc.layer(index, h_in, h_out)
        if progress and index == count - 1:
            progress(sum(sizes[: batch + 1]), total)

    layerwise.run(model, family, forwards, on_layer).release()
    acc.end_batch()


@contextlib.contextmanager
def observe_forwards(
    model: Any,
    family: Any,
    acc: "LayerStatsAccumulator",
    masks_for: Callable[[torch.Tensor, torch.Tensor, int], Mapping[str, torch.Tensor]],
) -> Iterator[list[int]]:
    """Accumulate statistics over every forward pass of ``model`` while the block runs
    (a sampler's denoising steps, say). ``masks_for(input_ids, attention_mask, call)`` gives
    the position groups of each pass; yields the pass counter."""
    calls = [0]

    def before(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        attn = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(ids)
        masks = masks_for(ids, attn.bool(), calls[0])
        # the positions measured at all: the union of the groups (rows a caller leaves out,
        # such as a guidance batch's unconditional half, stay out of the profile too)
        measured = torch.zeros_like(attn, dtype=torch.bool)
        for mask in masks.values():
            measured |= mask.to(measured.device)
        acc.begin_batch(measured, masks)

    def after(module, args, kwargs, output):
        acc.end_batch()
        calls[0] += 1

    handles = _hook_layers(model, family, acc, stop_after_last=False)
    handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
    handles.append(model.register_forward_hook(after, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def build_result(
    acc: LayerStatsAccumulator,
    *,
    model_info: dict,
    calib: calibration.CalibrationSet,
    settings: dict,
    primary: str = "tokens",
) -> Analysis:
    """The schema-versioned result. Groups no token fell in are left out, except the
    primary one, whose emptiness is an error."""
    groups = {name: acc.group_result(name) for name in acc.groups if acc.groups[name].count or name == primary}
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "repskip.analysis",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "calibration": calib.describe(),
        "settings": settings,
        "primary_group": primary,
        "groups": groups,
        "token_distance_profile": acc.profile_result(),
        "versions": versions(),
    }
    return Analysis(data)
