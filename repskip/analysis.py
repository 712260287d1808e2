"""Layer-by-layer, token-by-token statistics of how much each decoder layer changes the
representation, accumulated in streaming form.

Forward hooks on every decoder layer see the raw hidden state entering and leaving it (never
the final-normed entry of ``output_hidden_states``). Each batch's states are reduced to
running sums at once, so memory is bounded by one batch, whatever the number of sequences:
per-layer sums are O(L), the layer x layer similarity matrix O(L^2), the token-distance
profile O(L x max_distance).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__, calibration
from .errors import RepskipError

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

    def __post_init__(self) -> None:
        L, dev = self.num_layers, self.device
        f64 = dict(dtype=torch.float64, device=dev)
        self.cos_sum = torch.zeros(L, **f64)
        self.cos_sq_sum = torch.zeros(L, **f64)
        self.cos_min = torch.full((L,), math.inf, **f64)
        self.cos_max = torch.full((L,), -math.inf, **f64)
        self.angle_sum = torch.zeros(L, **f64)
        self.gram_sum = torch.zeros(L + 1, L + 1, **f64)


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
    ):
        self.num_layers = num_layers
        self.max_distance = max_distance
        self.device = torch.device(device)
        self.groups = {g: _GroupSums(num_layers, self.device) for g in groups}
        f64 = dict(dtype=torch.float64, device=self.device)
        self.profile_sum = torch.zeros(num_layers, max_distance + 1, **f64)
        self.profile_pairs = torch.zeros(max_distance + 1, **f64)
        self.sequences = 0
        self._batch: dict[str, Any] | None = None

    # --- one batch -------------------------------------------------------------------
    def begin_batch(self, valid: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> None:
        """Start a batch: ``valid`` marks real tokens [B, T]; ``masks`` selects each group."""
        valid = valid.to(self.device, torch.bool)
        selectors = {}
        for name in self.groups:
            mask = masks[name].to(self.device, torch.bool) & valid
            selectors[name] = mask
            self.groups[name].count += int(mask.sum())
        T = valid.shape[1]
        pos = torch.arange(T, device=self.device)
        dist = pos[:, None] - pos[None, :]  # i - j
        pairs = valid[:, :, None] & valid[:, None, :] & (dist > 0) & (dist <= self.max_distance)
        pair_dist = dist.expand_as(pairs)[pairs]
        self.profile_pairs += torch.bincount(pair_dist, minlength=self.max_distance + 1).double()
        self.sequences += valid.shape[0]
        self._batch = {"sel": selectors, "pairs": pairs, "pair_dist": pair_dist, "units": {}}

    def layer(self, index: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """Take in layer ``index``'s input and output states, [B, T, D] each."""
        batch = self._batch
        if batch is None:
            raise RuntimeError("begin_batch must be called before layer")
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
            # Layer-similarity matrix: the new state against every earlier one. The states
            # of this batch sit in one preallocated buffer, so no step copies earlier ones.
            units = batch["units"].get(name)
            if units is None:
                n, width = u_in.shape
                units = batch["units"][name] = torch.empty(self.num_layers + 1, n, width, device=self.device)
                units[0] = u_in
                sums.gram_sum[0, 0] += n
            k = index + 1
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
        matrix = (s.gram_sum / n).clamp(-1.0, 1.0)
        return {
            "tokens": n,
            "layers": layers,
            "similarity_matrix": [[round(float(v), 6) for v in row] for row in matrix],
        }

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

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    @classmethod
    def from_dict(cls, data: dict) -> "Analysis":
        version = data.get("schema_version")
        if data.get("kind") != "repskip.analysis" or version is None:
            raise RepskipError("not a repskip analysis file (no kind/schema_version)")
        if version > SCHEMA_VERSION:
            raise RepskipError(
                f"analysis schema_version {version} is newer than this repskip understands "
                f"({SCHEMA_VERSION}); upgrade repskip"
            )
        return cls(data)


def position_masks(valid: torch.Tensor, positions: str) -> dict[str, torch.Tensor]:
    """The groups every AR analysis measures: the chosen positions and the last real token."""
    last = torch.zeros_like(valid, dtype=torch.bool)
    last[torch.arange(valid.shape[0]), valid.long().sum(1) - 1] = True
    tokens = valid.bool() if positions == "all" else last
    return {"tokens": tokens, "last_token": last}


def _versions() -> dict[str, str]:
    import transformers

    return {"repskip": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


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
    mask_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LayerStatsAccumulator:
    """Run the calibration batches through ``model`` with hooks and return the sums.

    ``mask_fn`` maps a batch's validity mask to the position groups; by default the groups
    are ``tokens`` (as ``positions`` says) and ``last_token``.
    """
    if positions not in POSITIONS:
        raise RepskipError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    layers = family.decoder_layers(model)
    L = len(layers)
    device = next(model.parameters()).device
    groups = ["tokens", "last_token"]
    acc = LayerStatsAccumulator(L, groups, max_distance=max_distance, device=device)

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            acc.layer(index, h_in, family.layer_output(output))
            if index == L - 1:
                raise _StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    total = len(calib.sequences)
    done = 0
    try:
        for ids, mask in calibration.batches(calib.sequences, batch_size, pad_id):
            valid = mask.bool()
            masks = mask_fn(valid) if mask_fn else position_masks(valid, positions)
            acc.begin_batch(valid, masks)
            try:
                family.logits(model, ids.to(device), mask.to(device))
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


def build_result(
    acc: LayerStatsAccumulator,
    *,
    model_info: dict,
    calib: calibration.CalibrationSet,
    settings: dict,
) -> Analysis:
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "repskip.analysis",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "calibration": calib.describe(),
        "settings": settings,
        "primary_group": "tokens",
        "groups": {name: acc.group_result(name) for name in acc.groups},
        "token_distance_profile": acc.profile_result(),
        "versions": _versions(),
    }
    return Analysis(data)
