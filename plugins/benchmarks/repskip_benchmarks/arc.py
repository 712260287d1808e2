"""ARC-Easy and ARC-Challenge (Clark et al. 2018) as log-likelihood multiple choice, defined
as lm-evaluation-harness's ``arc_easy`` / ``arc_challenge`` tasks, so their figures compare.

Each item is zero-shot: the context ``"Question: {question}\\nAnswer:"``, the choices the answer
texts, each scored as the continuation ``" " + text`` (lm-eval's target delimiter). The
reference is the index of ``answerKey`` among the choice labels (A-D, A-E, 1-4, ...). verify
computes each continuation's log-probability (exact for autoregressive models; for diffusion
models the masked Monte Carlo estimate with ``mc_samples`` draws) and the metrics are ``acc``
(the most likely choice is right) and ``acc_norm`` (the primary metric: the same with each
log-probability divided by the choice text's length in characters).

Data: a local JSONL file in AI2's layout (``id``, ``question: {stem, choices: [{text, label}]}``,
``answerKey``), or Parquet/JSONL rows in the Hub's layout (``id``, ``question`` text,
``choices: {text: [...], label: [...]}``, ``answerKey``); without a file, the test split of the
Hub dataset allenai/ai2_arc (Parquet: needs pyarrow). Item ids are the records' ``id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from repskip.benchmark import Item
from repskip.errors import RepskipError

from . import sources
from .common import BaseBenchmark, as_int

HUB_REPO = "allenai/ai2_arc"
MC_SAMPLES = 32


class _ARC(BaseBenchmark):
    subset: ClassVar[str] = ""
    kind = "multiple_choice"
    primary_metric = "acc_norm"
    option_defaults = {"mc_samples": MC_SAMPLES}

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "mc_samples":
            return as_int(self.name, key, value, 1)
        return super()._check_option(key, value)

    def load(self, source: str | Path | None = None) -> list[Item]:
        if source is None:
            source = sources.hub_file(self.name, HUB_REPO, f"{self.subset}/test-00000-of-00001.parquet")
        path, records = sources.read_records(self.name, source)
        items, seen = [], {}
        for record in records:
            item = self._item(path, record)
            if item.id in seen:
                raise RepskipError(f"{self.name}: {path} {record.where}: id {item.id!r} is already used by "
                                   f"{seen[item.id]}; item ids must be unique")
            seen[item.id] = record.where
            items.append(item)
        return items

    def _item(self, path: Path, record: sources.Record) -> Item:
        name = self.name
        ident = sources.field(name, path, record, "id")
        question = sources.field(name, path, record, "question", (str, dict))
        if isinstance(question, dict):  # AI2's own layout: question{stem, choices[{text, label}]}
            inner = sources.Record(record.index, record.where, question)
            stem = sources.field(name, path, inner, "stem")
            choices = sources.field(name, path, inner, "choices", list)
            if not all(isinstance(c, dict) for c in choices):
                raise RepskipError(f"{name}: {path} {record.where}: question.choices must be a list of objects")
            texts = [sources.field(name, path, sources.Record(record.index, record.where, c), "text") for c in choices]
            labels = [sources.field(name, path, sources.Record(record.index, record.where, c), "label", (str, int))
                      for c in choices]
        else:  # the Hub's layout: question text, choices{text: [...], label: [...]}
            stem = question
            choices = sources.field(name, path, record, "choices", dict)
            inner = sources.Record(record.index, record.where, choices)
            texts = sources.string_list(name, path, inner, "text")
            labels = sources.field(name, path, inner, "label", list)
            if not all(isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels):
                raise RepskipError(f"{name}: {path} {record.where}: choices.label must be a list of strings")
        labels = [str(label) for label in labels]
        key = str(sources.field(name, path, record, "answerKey", (str, int)))
        if len(texts) < 2 or len(texts) != len(labels):
            raise RepskipError(f"{name}: {path} {record.where}: expected two or more choices, each with a text and a "
                               f"label (got {len(texts)} texts, {len(labels)} labels)")
        if len(set(labels)) != len(labels):
            raise RepskipError(f"{name}: {path} {record.where}: choice labels {labels} repeat")
        if key not in labels:
            raise RepskipError(f"{name}: {path} {record.where}: answerKey {key!r} is not among the choice labels "
                               f"{', '.join(labels)}")
        return Item(id=ident, prompt=f"Question: {stem}\nAnswer:", reference=labels.index(key),
                    meta={"choices": texts, "labels": labels, "question": stem})


class ARCEasy(_ARC):
    name = "arc_easy"
    subset = "ARC-Easy"
    default_source = f"the Hugging Face Hub dataset {HUB_REPO} (ARC-Easy, test split)"


class ARCChallenge(_ARC):
    name = "arc_challenge"
    subset = "ARC-Challenge"
    default_source = f"the Hugging Face Hub dataset {HUB_REPO} (ARC-Challenge, test split)"
