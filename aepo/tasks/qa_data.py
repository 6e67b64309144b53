"""Reading a user's QA data: question/answer rows and a retrieval corpus, from JSONL or Parquet
through Hugging Face ``datasets`` (local files or a saved dataset; nothing is downloaded), with
errors that name the file, the row and the field."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aepo.rollout.tools.search import Document, SearchTool

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad user data; the message names the file (or dataset), the row and the field."""


@dataclass(frozen=True)
class Fields:
    """Which columns hold what (``task.options.question_key`` etc.)."""

    question: str = "question"
    answers: str = "answers"
    id: str = "id"
    group: str | None = None  # optional column whose values the trainer logs EM by


def open_rows(
    source: str | Path | None = None, *, hf_dataset: str | None = None, split: str = "train"
):
    """A ``datasets.Dataset`` of a JSONL/Parquet file, or of a dataset saved with
    ``save_to_disk`` at ``hf_dataset`` (its ``split`` when it is a DatasetDict), or of a hub
    dataset named ``hf_dataset`` that is already in the local cache (nothing is downloaded)."""
    import datasets

    if hf_dataset is not None:
        if not Path(hf_dataset).exists():
            return _from_hub_cache(hf_dataset, split)
        data = datasets.load_from_disk(hf_dataset)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"hf_dataset {hf_dataset!r} has no split {split!r}: {list(data)}")
            data = data[split]
        return data
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use {', '.join(FORMATS)}")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parse errors in several exception types
        raise DataError(f"{path}: cannot be read as {kind}: {exc}") from exc


def _from_hub_cache(name: str, split: str):
    """A hub dataset already in the local HF cache; never downloads."""
    import datasets

    datasets.config.HF_HUB_OFFLINE = True  # cache only: this process never downloads
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"hf_dataset {name!r}: not a directory (save_to_disk output) and not in the local "
            f"HF datasets cache for split {split!r} ({type(exc).__name__}: {exc})"
        ) from exc


def _answers(value: Any, where: str, key: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list | tuple) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field {key!r} must be a string or a list of strings")
    answers = [a for a in answers if a.strip()]
    if not answers:
        raise DataError(f"{where}: field {key!r} is empty (no non-blank answer)")
    return answers


def qa_rows(data, name: str, fields: Fields = Fields()) -> list[dict[str, Any]]:
    """Checked samples ``{"id", "question", "answers": [str, ...], (group)}`` of ``data``.

    Raises :class:`DataError` naming ``name``, the 1-based row (for JSONL without blank lines,
    the line) and the field for a missing question or answers field, a non-string question, or
    empty answers."""
    out, columns = [], set(data.column_names)
    for key in (fields.question, fields.answers, fields.group):
        if key is not None and key not in columns:
            raise DataError(
                f"{name}: no field {key!r} in any row (fields: {', '.join(sorted(columns))})"
            )
    for i, row in enumerate(data):
        where = f"{name} row {i + 1}"
        question = row[fields.question]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field {fields.question!r} is missing or not a string")
        sample = {
            "id": str(row.get(fields.id) if row.get(fields.id) is not None else i),
            "question": question.strip(),
            "answers": _answers(row[fields.answers], where, fields.answers),
        }
        if fields.group is not None:
            sample[fields.group] = row[fields.group]
        out.append(sample)
    if not out:
        raise DataError(f"{name}: no rows")
    return out


def corpus_documents(path: str | Path) -> Iterable[Document]:
    """Documents of a JSONL/Parquet corpus: fields ``id`` (optional), ``title`` (optional) and
    ``contents`` (Search-R1's "title\\ntext") or ``text``."""
    data = open_rows(path)
    for i, row in enumerate(data):
        doc_id = str(row.get("id") if row.get("id") is not None else i)
        text, contents = row.get("text"), row.get("contents")
        if isinstance(text, str) and text.strip():
            yield Document(doc_id, str(row.get("title") or ""), text.strip())
        elif isinstance(contents, str) and contents.strip():
            yield Document.from_contents(contents, id=doc_id)
        else:
            raise DataError(f"{path} row {i + 1}: no text (field 'text' or 'contents')")


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_search_tool(
    corpus: str | Path, cache_dir: str | Path, options: Mapping[str, Any]
) -> SearchTool:
    """A :class:`SearchTool` over ``corpus``, its SQLite FTS5 index built once into
    ``cache_dir`` (named by the corpus file's SHA-256, so an edited corpus is re-indexed) and
    reopened afterwards; ``options``: top_k, snippet_chars, timeout_s."""
    from tqdm import tqdm

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    index = cache / f"search-{file_digest(corpus)[:16]}.sqlite"
    if not index.is_file():
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        docs = tqdm(
            corpus_documents(corpus),
            desc=f"indexing {Path(corpus).name}",
            unit="doc",
            mininterval=1.0,
        )
        SearchTool(docs, path=tmp, **options).close()
        os.replace(tmp, index)  # atomic: a concurrent rank either sees it whole or builds it
    return SearchTool.open(index, **options)
