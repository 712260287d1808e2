"""Skip recipes: one YAML format, validated, versioned.

An *unresolved* recipe says how to choose layers (strategy, k, threshold, adjacency rule,
protected layers, calibration, positions). A *resolved* one adds the exact layers to remove
and where they came from: the model fingerprint, the scores, the calibration hash and the
tool versions. ``repskip.pipeline.resolve_recipe`` resolves an unresolved recipe by running the
analysis; ``compress`` takes a resolved one.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from typing import TYPE_CHECKING

from .errors import RepskipError
from .analyze.selection import STRATEGIES, select

if TYPE_CHECKING:  # the analysis module needs torch; a recipe does not
    import numpy as np

    from .analyze.analysis import Analysis

SCHEMA_VERSION = 1
MAX_RECIPE_BYTES = 16 * 1024 * 1024  # resolved recipes hold a few scores per layer: far below this


class _Strict(BaseModel):
    # strict: a YAML `remove: [true]` or `k: "4"` is an error, not silently an integer
    model_config = ConfigDict(extra="forbid", strict=True)


class CalibrationSpec(_Strict):
    source: str = Field("builtin", description="'builtin', or a .txt / .jsonl file path")
    field: str | None = Field(None, description="JSONL field holding the text")
    num_samples: int = Field(64, ge=1)
    max_length: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class SelectionSpec(_Strict):
    strategy: Literal["auto", "paper", "block-influence", "angular-block", "loss", "greedy-loss"] = "paper"
    k: int = Field(..., ge=1, description="number of layers to remove")
    threshold: float = Field(0.95, ge=-1.0, le=1.0, description="paper: min cosine to qualify")
    allow_adjacent: bool | None = Field(
        None, description="default: false for paper, true for block-influence"
    )
    protect_first: bool = True
    protect_last: bool = True
    protect: list[int] = Field(default_factory=list, description="more protected layers; -1 = last")
    positions: Literal["all", "last"] = "all"
    applies_to: Literal["any", "autoregressive", "diffusion"] = Field(
        "any", description="refuse models of the other kind"
    )
    mode: Literal["forward", "masked", "sampling"] | None = Field(
        None, description="analysis mode; default forward (AR) or masked (diffusion)"
    )
    mask_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    prompt_fraction: float = Field(0.5, ge=0.0, lt=1.0)
    sampler: dict = Field(default_factory=dict, description="sampler settings for mode sampling")
    chat: bool = Field(True, description="sampling mode: prompts through the chat template")
    objective: Literal["nll", "kl"] = Field(
        "nll", description="loss, greedy-loss: calibration loss to minimise (nll: the model's own loss; kl: to the full model)"
    )
    repair: Literal["none", "linear", "cosine"] = Field(
        "none", description="linear: fit a least-squares map per removed run and fold it into the layer in front"
    )
    ridge: float = Field(1e-3, gt=0, description="repair: ridge, relative to the mean diagonal of M^T M")
    search_samples: int = Field(
        16, ge=1, description="loss, greedy-loss: calibration sequences each trial is scored on (the first ones)"
    )


class RepairMap(_Strict):
    layer: int = Field(..., description="the kept layer whose MLP output projection takes the map (original index)")
    run: list[int] = Field(..., min_length=2, max_length=2, description="first and last removed layer of the run")
    residual: float | None = Field(None, description="|MT - D|^2 / |M - D|^2 on the calibration tokens (1 = no repair)")


class RepairRef(_Strict):
    method: Literal["linear", "cosine"] = "linear"
    file: str | None = Field(None, description="the maps (safetensors), relative to the recipe's folder")
    sha256: str = Field(..., description="hash of the maps file")
    ridge: float
    tokens: int | None = None
    maps: list[RepairMap]


class Candidate(_Strict):
    """One removal ``--strategy auto`` weighed (repskip.analyze.auto)."""

    remove: list[int]
    proposed_by: list[str] = Field(..., description="the strategies that chose it (or a block next to theirs)")
    loss: float = Field(..., description="mean calibration loss with it removed (and repaired), on the scored text")
    maps_kept: dict[str, bool] | None = Field(None, description="anchor layer -> whether its map passed the KL check "
                                                                "(checked for the winner only, as in the loss search)")
    loss_as_fitted: float | None = Field(None, description="its loss before the check changed its maps, if it did")
    fit_seconds: float = Field(..., description="time of its repair fit (unchecked)")
    check_seconds: float | None = Field(None, description="time of the checked fit, for a candidate that won")


class ModelRef(_Strict):
    fingerprint: str
    family: str
    model_type: str | None = None
    name_or_path: str | None = None


class Resolved(_Strict):
    remove: list[int] = Field(..., min_length=1, description="indices of the layers to remove (0-based)")
    num_layers: int | None = Field(None, description="layer count of the model it was made for")
    model: ModelRef | None = None
    metric: str | None = None
    group: str | None = None
    scores: list[float | None] | None = None
    calibration_hash: str | None = None
    sampler: dict | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    repair: RepairRef | None = Field(None, description="the linear repair folded in by compress, if any")
    candidates: list[Candidate] | None = Field(None, description="auto: every removal weighed, the chosen one "
                                                                 "of lowest loss")


class Recipe(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str | None = None
    description: str | None = None
    selection: SelectionSpec | None = None
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    resolved: Resolved | None = None
    _origin: Path | None = PrivateAttr(None)  # the file it was loaded from, for files it names

    def __eq__(self, other: object) -> bool:  # where a recipe was read from is not part of it
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    @property
    def is_resolved(self) -> bool:
        return self.resolved is not None

    def repair_maps(self, hidden: int) -> dict[int, "np.ndarray"]:
        """The linear repair maps a resolved recipe names (anchor layer -> T), read from the
        file beside it and checked against its hash; {} when it has no repair."""
        repair = self.resolved.repair if self.resolved else None
        if repair is None:
            return {}
        from .repair import store

        if repair.file is None:
            raise RepskipError("this recipe records a repair but not its maps file (a recipe copied into an exported "
                               "model keeps only the record): use the recipe and repair file 'repskip analyze' wrote")
        base = self._origin.parent if self._origin else Path.cwd()
        return store.load(base / repair.file, repair.sha256, [m.layer for m in repair.maps], hidden)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if self.selection is None:  # written by hand: no analysis ran, so no calibration to record
            data.pop("calibration", None)
        return yaml.safe_dump(data, sort_keys=False, width=100)

    def save(self, path: Path) -> None:
        """Write the recipe (beside, then renamed into place)."""
        from .outputs import write_atomic

        write_atomic(Path(path), self.to_yaml())


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def parse(data: object, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RepskipError(f"{origin} is not a YAML mapping; see docs/recipes.md")
    version = data.get("schema_version")
    if version is None:
        raise RepskipError(f"{origin} has no schema_version; add 'schema_version: 1'")
    if version != SCHEMA_VERSION:
        raise RepskipError(
            f"{origin} has schema_version {version}; this repskip reads {SCHEMA_VERSION}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RepskipError(f"{origin} is invalid: {_first_error(exc)}; see docs/recipes.md") from None
    if recipe.selection is None and recipe.resolved is None:
        raise RepskipError(f"{origin} has neither 'selection' nor 'resolved'; it says nothing to do")
    return recipe


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RepskipError(f"recipe {path} is a folder; pass the recipe YAML file")
    if not path.is_file():
        raise RepskipError(f"recipe file {path} does not exist")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RepskipError(f"recipe {path} is {path.stat().st_size:,} bytes, too large for a recipe; pass a recipe YAML")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except UnicodeDecodeError:
        raise RepskipError(f"recipe {path} is not UTF-8 text; pass a recipe YAML") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RepskipError(f"recipe {path} is not valid YAML ({first})") from None
    recipe = parse(data, f"recipe {path}")
    recipe._origin = path.resolve()
    return recipe


def is_recipe_file(path: Path) -> bool:
    """Whether ``path`` holds a repskip recipe (so that --force may replace it)."""
    try:
        load(path)
    except RepskipError:
        return False
    return True


def resolve(recipe: Recipe, analysis: "Analysis") -> Recipe:
    """A resolved copy of ``recipe``, choosing layers from ``analysis``."""
    if recipe.selection is None:
        raise RepskipError("the recipe has no 'selection' section to resolve")
    sel = recipe.selection
    choice = select(
        analysis,
        sel.strategy,
        sel.k,
        threshold=sel.threshold,
        allow_adjacent=sel.allow_adjacent,
        protect_first=sel.protect_first,
        protect_last=sel.protect_last,
        protect=sel.protect,
    )
    model = analysis.data["model"]
    used = analysis.data["settings"]
    cal = analysis.data["calibration"]
    # The resolved recipe records how the analysis was really run, whatever the spec said.
    calibration = CalibrationSpec(
        source=cal["source"],
        field=used.get("calib_field"),
        num_samples=used.get("num_samples", cal["sequences"]),
        max_length=cal["max_length"],
        batch_size=used.get("batch_size", 8),
        seed=used.get("seed", 0),
    )
    measured = {"positions": used.get("positions", "all"), "mode": used.get("mode")}
    if "mask_ratios" in used:
        measured.update(mask_ratios=used["mask_ratios"], prompt_fraction=used["prompt_fraction"])
    if "sampler" in used:
        measured["sampler"] = {k: v for k, v in used["sampler"].items() if k != "name"}
        measured["chat"] = used.get("chat", True)
    resolved = Resolved(
        remove=choice.remove,
        num_layers=analysis.num_layers,
        model=ModelRef(
            fingerprint=model["fingerprint"],
            family=model["family"],
            model_type=model.get("model_type"),
            name_or_path=model.get("path"),
        ),
        metric=choice.metric,
        group=choice.group,
        scores=[None if s is None else round(s, 6) for s in choice.scores],
        calibration_hash=analysis.data["calibration"]["hash"],
        sampler=analysis.data["settings"].get("sampler"),
        versions=analysis.data["versions"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        candidates=[Candidate(**{key: c[key] for key in Candidate.model_fields if key in c})
                    for c in analysis.data["auto"]["candidates"]] if sel.strategy == "auto" else None,
    )
    return recipe.model_copy(
        update={"resolved": resolved, "calibration": calibration, "selection": sel.model_copy(update=measured)}
    )


def check_applies(recipe: Recipe, fingerprint: str, num_layers: int) -> None:
    """Refuse a resolved recipe made for another model."""
    res = recipe.resolved
    assert res is not None
    if res.model is not None and res.model.fingerprint != fingerprint:
        made_for = res.model.name_or_path or res.model.model_type or "another model"
        raise RepskipError(
            f"the recipe was made for a different model ({made_for}, {res.model.fingerprint}); "
            f"this model is {fingerprint}: re-run 'repskip analyze' on this model"
        )
    if res.num_layers is not None and res.num_layers != num_layers:
        raise RepskipError(
            f"the recipe was made for a {res.num_layers}-layer model; this one has {num_layers}"
        )


def check_kind(recipe: Recipe, handle: Any) -> None:
    """Refuse a recipe whose applies_to rule excludes this model's kind."""
    kind = handle.family.generative_kind
    wanted = recipe.selection.applies_to if recipe.selection else "any"
    if wanted not in ("any", kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise RepskipError(
            f"the recipe applies to {wanted} models only; {handle.path.name} is {article} {kind} model "
            f"({handle.family_name})"
        )


def removed_layers(recipe: Recipe, handle: Any) -> list[int]:
    """The layers a resolved recipe removes, checked against the model."""
    check_kind(recipe, handle)
    if not recipe.is_resolved:
        raise RepskipError(
            "this recipe is unresolved (it says how to choose, not which layers): run "
            "'repskip analyze' or 'repskip compress' first, or pass a resolved recipe"
        )
    check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
    assert recipe.resolved is not None
    return list(recipe.resolved.remove)


def strategy_help() -> str:
    return ", ".join(STRATEGIES)
