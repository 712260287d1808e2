"""What the quality benches measure, shared so that their figures are the same measurement
(and their cache entries interchangeable): WikiText-2 perplexity over fixed windows and
ARC acc_norm per item, each finished measurement appended to a JSON-lines cache."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

ARC_FILES = {"arc_easy": "ARC-Easy-Test.jsonl", "arc_challenge": "ARC-Challenge-Test.jsonl"}


# quality.py's and heal.py's measurements, kept with the repository (see quality.py)
CACHE = Path(__file__).resolve().parent / "results" / "cache" / "quality.jsonl"


class Cache:
    """Finished steps by key, appended as JSON lines, each stamped with the commit it was
    measured at and when (``measured``), so a cache kept with the repository says where each
    of its numbers comes from."""

    def __init__(self, path: str | Path):
        import _common

        self.stamp = {"commit": _common.GIT_AT_START["commit"], "dirty": _common.GIT_AT_START["dirty_repskip"]}
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                self.data[record["key"]] = record

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, **value) -> dict:
        record = {"key": key, **value, "measured": {**self.stamp, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.data[key] = record
        return record


def ppl_windows(tokenizer, path: str, count: int, length: int) -> list[list[int]]:
    ids = tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise SystemExit(f"{path} has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def window_nll(cache: Cache, key: str, make: Callable[[], Any], fam: Any, windows: list[list[int]],
               say: Callable[[str], None], label: str) -> list[float]:
    """Mean next-token NLL of each window (cached under ``key``; ``make`` builds the model only on a miss)."""
    import torch

    from repskip.verify.likelihood import autoregressive_nll

    hit = cache.get(key)
    if hit:
        return hit["nll"]
    model = make()
    t = time.perf_counter()
    with torch.inference_mode():
        nll = [autoregressive_nll(model, fam, torch.tensor([w]))[0] / (len(w) - 1) for w in windows]
    say(f"ppl {label}: {ppl(nll):.3f} ({time.perf_counter() - t:.0f} s)")
    return cache.put(key, nll=nll)["nll"]


def load_arc(names: str, data: Path, limit: int = 0) -> dict[str, tuple[Any, list]]:
    from repskip.benchmark import get_benchmark

    out = {}
    for name in filter(None, names.split(",")):
        bench = get_benchmark(name)
        items = bench.load(data / "arc" / ARC_FILES[name])
        out[name] = (bench, items[:limit] if limit else items)
    return out


def arc_acc_norm(cache: Cache, key: str, make: Callable[[], Any], fam: Any, tokenizer: Any, bench: Any,
                 items: list, context: int | None, say: Callable[[str], None], label: str) -> list[float]:
    """acc_norm (0 or 1) of each item, lm-eval's definition (cached under ``key``; ``make`` builds the
    model only on a miss)."""
    import torch

    from repskip.verify.likelihood import continuation_logprobs

    hit = cache.get(key)
    if hit:
        return hit["acc_norm"]
    model = make()
    t = time.perf_counter()
    norm = []
    with torch.inference_mode():
        for at in range(0, len(items), 8):
            batch = items[at : at + 8]
            pairs = [(it.prompt, c) for it in batch for c in bench.continuations(it)]
            scored = continuation_logprobs(model, fam, tokenizer, pairs, batch_size=len(pairs), max_length=context)
            i = 0
            for it in batch:
                n = len(bench.continuations(it))
                norm.append(bench.score_choices(it, [lp for lp, _ in scored[i : i + n]])["acc_norm"])
                i += n
            if (at // 8 + 1) % max(1, len(items) // 80) == 0:  # a line per tenth
                say(f"{label}: {len(norm)}/{len(items)} items, {time.perf_counter() - t:.0f} s")
    say(f"{label}: acc_norm {sum(norm) / len(norm):.4f} on {len(norm)} ({time.perf_counter() - t:.0f} s)")
    return cache.put(key, acc_norm=norm)["acc_norm"]
