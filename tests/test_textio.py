"""Bounded reading and tokenising of calibration and perplexity text (repskip.textio): the
same texts, ids and hashes as the whole-file, whole-text code it replaced on ordinary data,
and bounded memory and time on a 60 MB file of one line."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner
from tokenizers import processors

from helpers import make_tokenizer
from repskip.analyze import calibration
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.textio import iter_paragraphs, split_paragraphs, tokenize_prefix
from repskip_benchmarks.perplexity import Perplexity

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKI = SHARED_DATA / "wikitext2"
GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"


def shared(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path


# --- the code this replaced, kept to compare with ---------------------------------------------
def old_paragraphs(text: str) -> list[str]:
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    return [b for b in blocks if len(b) >= calibration.MIN_CHARS]


def old_jsonl_texts(path: Path, field: str | None) -> list[str]:
    texts = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record, str):
            texts.append(record)
            continue
        key = field or next(k for k in calibration.TEXT_FIELDS if k in record)
        texts.append(str(record[key]))
    return texts


def old_pick_texts(source, field=None, num_samples=64, seed=0) -> list[str]:
    if source is None:
        texts = old_paragraphs(resources.files("repskip").joinpath("data/calibration.txt").read_text("utf-8"))
    elif Path(source).suffix == ".jsonl":
        texts = old_jsonl_texts(Path(source), field)
    else:
        texts = old_paragraphs(Path(source).read_text("utf-8"))
    texts = [t for t in texts if t.strip()]
    if len(texts) > num_samples:
        texts = random.Random(seed).sample(texts, num_samples)
    return texts


def old_build(tokenizer, source, num_samples=64, max_length=256, seed=0) -> tuple[list[list[int]], str]:
    sequences = []
    for text in old_pick_texts(source, num_samples=num_samples, seed=seed):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            sequences.append(list(ids))
    return sequences, "sha256:" + hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:32]


def old_perplexity_items(path: Path, chunk_chars: int) -> list[tuple[str, str]]:
    text = path.read_text("utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    items, chunk = [], ""
    for para in paragraphs:
        chunk = f"{chunk}\n\n{para}" if chunk else para
        if len(chunk) >= chunk_chars:
            items.append((f"ppl/{path.stem}/{len(items)}", chunk))
            chunk = ""
    if chunk:
        items.append((f"ppl/{path.stem}/{len(items)}", chunk))
    return items


# --- paragraphs ------------------------------------------------------------------------------
def test_paragraphs_equal_the_old_split_on_random_text_with_any_read_size(tmp_path):
    alphabet = ["a", "b", "c", " ", " ", "\t", "\n", "\n", "\n", "\r", "\r\n", "\u3000", "\x0b", "\x0c",
                "\x85", "\u2028", "é", "🤖"]
    rnd = random.Random(0)
    path = tmp_path / "t.txt"
    for _ in range(400):
        raw = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80)))
        path.write_bytes(raw.encode())
        text = path.read_text("utf-8")  # universal newlines, as the old code read it
        min_chars = rnd.choice([1, 4])
        want = [b.strip() for b in re.split(r"\n[ \t]*\n", text)]  # old_paragraphs, any min_chars
        want = [b for b in want if b and len(b) >= min_chars]
        cap = rnd.randint(1, 15)
        capped = [b.strip()[:cap] for b in re.split(r"\n[ \t]*\n", text)]
        capped = [b for b in capped if b and len(b) >= min_chars]
        for read_chars in (1, 2, 3, 7, 65536):
            got = list(iter_paragraphs(path, max_chars=10**6, min_chars=min_chars, read_chars=read_chars))
            assert got == want, (raw, read_chars)
            got = list(iter_paragraphs(path, max_chars=cap, min_chars=min_chars, read_chars=read_chars))
            assert got == capped, (raw, cap, read_chars)


def test_a_long_paragraph_is_cut_and_the_rest_skipped_in_bounded_reads():
    class Counting(io.StringIO):
        biggest = 0

        def readline(self, size=-1):
            line = super().readline(size)
            Counting.biggest = max(Counting.biggest, len(line))
            return line

    text = "  " + "x" * 1_000_000 + " tail\n \t \nsecond paragraph\n\n" + " " * 300_000 + "\n\nthird"
    got = list(split_paragraphs(Counting(text), max_chars=1000, read_chars=4096))
    assert got == ["x" * 1000, "second paragraph", "third"]
    assert Counting.biggest <= 4096


@pytest.mark.parametrize("name", ["valid.txt", "test.txt"])
def test_calibration_paragraphs_of_wikitext_are_unchanged(name):
    path = shared(WIKI / name)
    texts, label = calibration.load_texts(path)
    assert label == str(path)
    assert texts == old_paragraphs(path.read_text("utf-8")) and len(texts) > 500


def test_calibration_texts_of_jsonl_are_unchanged():
    path = shared(GSM8K)
    texts, _ = calibration.load_texts(path)
    assert texts == old_jsonl_texts(path, None) and len(texts) > 1000


# --- calibration sets: the same ids and hash ---------------------------------------------------
def calibration_sources() -> list:
    return [None, WIKI / "valid.txt", WIKI / "test.txt", GSM8K]


def check_calibration_unchanged(tok, max_lengths):
    for source in calibration_sources():
        if source is not None:
            shared(source)
        for max_length in max_lengths:
            for num_samples, seed in ((64, 0), (16, 3)):
                want, want_hash = old_build(tok, source, num_samples, max_length, seed)
                got = calibration.build(tok, source, num_samples=num_samples, max_length=max_length, seed=seed)
                assert got.sequences == want, (source, max_length, num_samples, seed)
                assert got.hash == want_hash


def test_calibration_sets_and_hashes_are_unchanged():
    check_calibration_unchanged(make_tokenizer(), (256, 2048))


# --- tokenize_prefix -------------------------------------------------------------------------
def hard_texts(n: int = 6000) -> list[str]:
    """Short texts, and texts of about ``n`` characters or more of every awkward kind."""
    rnd = random.Random(1)
    wiki = (WIKI / "test.txt").read_text("utf-8") if (WIKI / "test.txt").is_file() else ""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
              (0x300, 0x36F)]
    wide = "".join(chr(rnd.randint(*rnd.choice(blocks))) for _ in range(n))
    words = "".join(rnd.choice(["word", " ", "  ", "\n", "\t", "12345", "é", "🤖", "ﬁ", "\u0301", "'s", "..."])
                    for _ in range(n // 2))
    return [
        "", "a", "Hi.", "Hello world, this is short.",
        "The quick brown fox jumps over the lazy dog. " * (n // 40),
        "Grüße aus 東京都! naïve café — ﬁ ligatures, e\u0301 combining, 🤖🎉 emoji. " * (n // 60),
        "a" * 3 * n, "é" * n, "🤖" * n, " " * 2 * n, "\n" * n, "1234567890" * (n // 10),
        "http://example.com/" + "x" * n + "?q=1", "ab" * n, "\t \n" * (n // 3),
        wide, words, wiki[: 5 * n], wiki[777:5000],
    ]


def tokenizer_variants():
    plain = make_tokenizer()
    framed = make_tokenizer()  # adds a BOS and an EOS, as many real tokenizers do
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)]
    )
    left = make_tokenizer()
    left.backend_tokenizer.post_processor = framed.backend_tokenizer.post_processor
    left.truncation_side = "left"
    return {"plain": plain, "bos-eos": framed, "left": left}


def check_prefix_equals_truncation(tok, texts, max_tokens_list, kwargs_list=({}, {"add_special_tokens": False})):
    for text in texts:
        for max_tokens in max_tokens_list:
            for kwargs in kwargs_list:
                want = tok(text, truncation=True, max_length=max_tokens, **kwargs)["input_ids"]
                got = tokenize_prefix(tok, text, max_tokens, **kwargs)
                assert got == list(want), (text[:60], len(text), max_tokens, kwargs)


@pytest.mark.parametrize("variant", ["plain", "bos-eos", "left"])
def test_tokenize_prefix_equals_whole_text_truncation(variant):
    tok = tokenizer_variants()[variant]
    first = tok("x" * 5000, truncation=True, max_length=10)["input_ids"][0]
    assert first == tok.convert_tokens_to_ids("x" if variant == "plain" else "<|im_start|>")
    check_prefix_equals_truncation(tok, hard_texts(), (1, 2, 3, 64, 300))


def test_sampling_prompts_keep_the_first_max_length_tokens_as_before():
    tok = make_tokenizer()  # the analysis in sampling mode cut the whole text's ids: [:max_length]
    for text in calibration.builtin_texts() + hard_texts(3000):
        for max_length in (16, 256):
            want = tok(text, add_special_tokens=False)["input_ids"][:max_length]
            assert tokenize_prefix(tok, text, max_length, add_special_tokens=False) == want


def test_tokenize_prefix_reads_only_a_bounded_prefix():
    seen, real = [], make_tokenizer()

    class Spy:
        truncation_side = "right"

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return real(text, **kwargs)

    ids = tokenize_prefix(Spy(), "word " * 2_000_000, 64)
    assert len(ids) == 64 and max(seen) < 16 * 200


# --- bounded memory and time on hostile files -------------------------------------------------
BIG_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    sys.path.insert(0, {tests!r})
    from helpers import make_tokenizer
    tok = make_tokenizer()
    start = time.perf_counter()
    if {kind!r} == "perplexity":
        from repskip_benchmarks.perplexity import Perplexity
        items = Perplexity().load({path!r})
        out = [len(items), len(items[0].prompt)]
    else:
        from repskip.analyze import calibration
        cal = calibration.build(tok, {path!r}, num_samples=4, max_length=64)
        out = [len(cal.sequences), len(cal.sequences[0])]
    seconds = time.perf_counter() - start
    try:  # this process's own peak: ru_maxrss can carry the forking parent's size across exec
        with open("/proc/self/status") as f:
            peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(out[0], out[1], seconds, peak_kb)
""")


def write_one_line(path: Path, size: int, jsonl: bool = False) -> None:
    block = ("lorem ipsum dolor sit amet, consectetur adipiscing elit " * 1000).encode()
    with open(path, "wb") as f:
        f.write(b'{"text": "' if jsonl else b"")
        for _ in range(size // len(block) + 1):
            f.write(block)
        f.write(b'"}\n' if jsonl else b"\n")


@pytest.mark.parametrize("kind", ["calibration-txt", "calibration-jsonl", "perplexity"])
def test_a_60mb_single_line_file_stays_bounded(tmp_path, kind):
    path = tmp_path / ("big.jsonl" if kind == "calibration-jsonl" else "big.txt")
    write_one_line(path, 60_000_000, jsonl=kind == "calibration-jsonl")
    assert path.stat().st_size > 60_000_000
    script = BIG_SCRIPT.format(tests=str(Path(__file__).parent), kind=kind, path=str(path))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 30  # the imports included
    count, length, seconds, peak_kb = done.stdout.split()
    assert int(count) == 1
    assert int(length) == (1_000_000 if kind == "perplexity" else 64)
    assert float(seconds) < 10, seconds
    peak_mb = int(peak_kb) / 1024  # torch and transformers alone take about 250 MB
    assert peak_mb < 600, f"{kind}: peak RSS {peak_mb:.0f} MB"


# --- perplexity items ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_chars", [2000, 500, 1])
def test_perplexity_items_of_wikitext_are_unchanged(chunk_chars):
    path = shared(WIKI / "test.txt")
    items = Perplexity(chunk_chars=chunk_chars).load(path)
    assert [(it.id, it.prompt) for it in items] == old_perplexity_items(path, chunk_chars)


def test_perplexity_refuses_a_folder_and_non_utf8(tmp_path):
    with pytest.raises(RepskipError, match="is a folder; pass a text file"):
        Perplexity().load(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\n\xff\xfe broken")
    with pytest.raises(RepskipError, match="is not UTF-8 text"):
        Perplexity().load(bad)


# --- refusals --------------------------------------------------------------------------------
def test_calibration_refuses_a_folder_and_non_utf8_in_one_line(tmp_path):
    with pytest.raises(RepskipError) as err:
        calibration.load_texts(tmp_path)
    assert str(err.value) == f"calibration source {tmp_path} is a folder; pass a .txt or .jsonl file"
    for name in ("bad.txt", "bad.jsonl"):
        bad = tmp_path / name
        bad.write_bytes(b'"a fine first record, long enough"\n\n"\xff\xfe broken"\n' + b"x" * 200_000)
        with pytest.raises(RepskipError) as err:
            calibration.load_texts(bad)
        assert str(err.value) == f"calibration file {bad} is not UTF-8 text"


def test_cli_analyze_with_a_folder_as_calib_is_a_one_line_error(tiny, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("A paragraph of calibration text, long enough to count.\n")
    out = tmp_path / "out"
    args = ["analyze", str(tiny["llama"]), "-o", str(out), "--calib", str(folder), "-k", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # a progress bar may come first
    assert errors[0] == f"error: calibration source {folder} is a folder; pass a .txt or .jsonl file"
    assert not out.exists()


# --- the real tokenizer ----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tokenizer_prefix_and_calibration_are_unchanged():
    from transformers import AutoTokenizer

    from repskip.default_model import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    check_prefix_equals_truncation(tok, hard_texts(40_000), (1, 2, 17, 256, 1024))
    if (WIKI / "test.txt").is_file():  # many long wiki texts cut at every kind of place
        paragraphs = old_paragraphs((WIKI / "test.txt").read_text("utf-8"))
        joined = ["\n\n".join(paragraphs[i : i + 12]) for i in range(0, len(paragraphs), 12)]
        check_prefix_equals_truncation(tok, joined, (64, 256), ({},))
    check_calibration_unchanged(tok, (256, 64))
