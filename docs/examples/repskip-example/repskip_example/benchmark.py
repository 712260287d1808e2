"""ARC-Easy as a generative multiple-choice benchmark: the model answers with a letter."""

from __future__ import annotations

import json
import re
from pathlib import Path

from repskip.benchmark import Benchmark, Item
from repskip.errors import RepskipError


class ARCEasy(Benchmark):
    default_source = "a local ARC-Easy-Test.jsonl (AI2 ARC, fields id, question, answerKey)"
    primary_metric = "accuracy"
    max_new_tokens = 8

    def load(self, source: str | Path | None = None) -> list[Item]:
        if source is None:
            raise RepskipError(f"arc-easy needs a data file: pass {self.default_source}")
        path = Path(source)
        if not path.is_file():
            raise RepskipError(f"arc-easy data file {path} does not exist")
        items = []
        for line in path.read_text("utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            choices = "\n".join(f"{c['label']}. {c['text']}" for c in row["question"]["choices"])
            prompt = f"{row['question']['stem']}\n{choices}\nAnswer with the letter of the correct choice."
            items.append(Item(row["id"], prompt, row["answerKey"]))
        if not items:
            raise RepskipError(f"arc-easy data file {path} holds no items")
        return items

    def score(self, item: Item, completion: str) -> dict[str, float]:
        # The first standalone choice label in the completion is the answer.
        match = re.search(r"\b([A-E1-5])\b", completion)
        return {"accuracy": float(match is not None and match.group(1) == item.reference)}
