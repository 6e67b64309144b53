"""Search tools: a local BM25 index (stdlib sqlite3 FTS5, or bm25s) and a client for
Search-R1-style retrieval servers. Both answer ``tool(query) -> ToolOutput`` and never raise."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aepo.rollout.tools.base import ToolOutput

NO_RESULTS = "No results."
_MAX_QUERY_TERMS = 64  # longer queries are cut: OR-ing hundreds of terms only slows sqlite down
_TERM = re.compile(r"\w+")  # query terms; any quote, operator or bracket is a separator
_FTS_TABLE = "docs"
# Porter stemming over unicode61 (diacritics folded), close to Lucene/pyserini's English BM25.
_FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
_PROGRESS_EVERY = 100  # sqlite VM instructions between two deadline checks


@dataclass(frozen=True)
class Document:
    """One retrievable passage."""

    id: str
    title: str
    text: str

    @classmethod
    def from_contents(cls, contents: str, id: str = "") -> Document:
        """Parse Search-R1's ``contents`` field: the title on the first line, then the text.
        Titles quoted as in the wiki-18 corpus (``"Paris"``) lose their quotes."""
        title, _, text = contents.partition("\n")
        title = title.strip()
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        return cls(id=id, title=title, text=text.strip())

    @property
    def contents(self) -> str:
        """Search-R1's ``contents`` field: ``"title\\ntext"``."""
        return f"{self.title}\n{self.text}"


def format_results(docs: Sequence[Document], snippet_chars: int | None = None) -> str:
    """The text the policy sees: ``Doc 1 (Title): text`` lines, or ``No results.``.
    Whitespace in each text is collapsed so that a document is one line; ``snippet_chars``
    cuts each text to that many characters (``...`` marks a cut)."""
    if not docs:
        return NO_RESULTS
    lines = []
    for i, doc in enumerate(docs, start=1):
        text = " ".join(doc.text.split())
        if snippet_chars is not None and len(text) > snippet_chars:
            text = text[:snippet_chars].rstrip() + "..."
        lines.append(f"Doc {i} ({doc.title}): {text}")
    return "\n".join(lines)


def query_terms(query: str) -> list[str]:
    """Word terms of a free-text query, deduplicated (case-insensitively) in order. Everything
    that is not a word character (quotes, ``*``, ``-``, ``:``, brackets) separates terms, so no
    term can carry query syntax."""
    seen: set[str] = set()
    terms = []
    for term in _TERM.findall(query):
        key = term.casefold()
        if key not in seen:
            seen.add(key)
            terms.append(term)
    return terms[:_MAX_QUERY_TERMS]


def fts5_match_expression(query: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: every term double-quoted (a string, never an
    operator such as ``AND``/``NEAR``/``OR``), the terms OR-ed. ``None`` when the query has no
    word characters."""
    terms = query_terms(query)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


class _Index(Protocol):
    """A retrieval backend: ranked (document, score) pairs, higher score = better."""

    def search(self, query: str, k: int, deadline: float) -> list[tuple[Document, float]]: ...

    def __len__(self) -> int: ...


class _Fts5Index:
    """An sqlite3 FTS5 table ranked by ``bm25()``; one connection guarded by a lock, so the
    index may be shared by threads. Queries past ``deadline`` are interrupted."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def build(cls, documents: Iterable[Document], path: str | Path | None) -> _Fts5Index:
        """Index ``documents`` in memory, or in a new database file at ``path``."""
        if path is not None and Path(path).exists():
            raise FileExistsError(f"{path} exists; reopen it with SearchTool.open(path)")
        conn = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False)
        conn.execute(
            f"CREATE VIRTUAL TABLE {_FTS_TABLE} USING fts5("
            f"doc_id UNINDEXED, title, text, tokenize='{_FTS_TOKENIZER}')"
        )
        rows = ((d.id, d.title, d.text) for d in documents)
        try:
            with conn:
                conn.executemany(
                    f"INSERT INTO {_FTS_TABLE}(doc_id, title, text) VALUES (?, ?, ?)", rows
                )
                conn.execute(f"INSERT INTO {_FTS_TABLE}({_FTS_TABLE}) VALUES ('optimize')")
        except BaseException:
            conn.close()
            if path is not None:  # no half-built index left behind for open() to find
                Path(path).unlink(missing_ok=True)
            raise
        return cls(conn)

    @classmethod
    def open(cls, path: str | Path) -> _Fts5Index:
        """Reopen an index built with ``path=`` (read-only)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no search index at {path}")
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            conn.execute(f"SELECT doc_id, title, text FROM {_FTS_TABLE} LIMIT 0")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise ValueError(f"{path} is not a search index built by SearchTool: {e}") from e
        return cls(conn)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute(f"SELECT count(*) FROM {_FTS_TABLE}").fetchone()[0]

    def search(self, query: str, k: int, deadline: float) -> list[tuple[Document, float]]:
        expr = fts5_match_expression(query)
        if expr is None or k <= 0:
            return []
        # bm25() is lower-is-better (negative); report its negation. Weights: doc_id, title, text.
        sql = (
            f"SELECT doc_id, title, text, bm25({_FTS_TABLE}, 0.0, 1.0, 1.0) AS s "
            f"FROM {_FTS_TABLE} WHERE {_FTS_TABLE} MATCH ? ORDER BY s, rowid LIMIT ?"
        )
        with self._lock:
            self._conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_EVERY)
            try:
                rows = self._conn.execute(sql, (expr, k)).fetchall()
            except sqlite3.OperationalError as e:
                if "interrupt" in str(e):
                    raise TimeoutError("search exceeded its time limit") from e
                raise
            finally:
                self._conn.set_progress_handler(None, 0)
        return [(Document(str(i), t, x), -s) for i, t, x, s in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Bm25sIndex:
    """The optional ``bm25s`` backend (in memory only; no deadline: a query is one sparse
    matrix product)."""

    def __init__(self, documents: Iterable[Document]) -> None:
        try:
            import bm25s
        except ImportError as e:
            raise ImportError(
                'backend="bm25s" needs the bm25s package: pip install bm25s '
                '(or use the default backend="fts5", which needs nothing)'
            ) from e
        self._bm25s = bm25s
        self._docs = list(documents)
        corpus = [f"{d.title}\n{d.text}" for d in self._docs]
        self._retriever = bm25s.BM25()
        self._retriever.index(
            bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    def search(self, query: str, k: int, deadline: float) -> list[tuple[Document, float]]:
        del deadline
        tokens = self._bm25s.tokenize(
            [query], stopwords="en", return_ids=False, show_progress=False
        )[0]
        vocab = self._retriever.vocab_dict
        tokens = [t for t in tokens if t in vocab]
        k = min(k, len(self._docs))
        if not tokens or k <= 0:
            return []
        with self._lock:
            ids, scores = self._retriever.retrieve([tokens], k=k, show_progress=False)
        hits = zip(ids[0].tolist(), scores[0].tolist(), strict=True)
        return [(self._docs[i], float(s)) for i, s in hits if s > 0]


class SearchTool:
    """Local BM25 search over a fixed corpus, as the ``search`` tool.

    ``documents`` are indexed once at construction: in memory, or in a new sqlite file at
    ``path`` that :meth:`open` reopens later without re-indexing. The policy's free-text query is
    reduced to OR-ed quoted terms, so query syntax in it can never raise; a query with no words
    gives ``No results.``. Results are cached (LRU over the lower-cased, whitespace-collapsed
    query). A query past ``timeout_s`` (fts5 backend) gives ``ok=False, error="timeout"``.
    """

    name = "search"

    def __init__(
        self,
        documents: Iterable[Document],
        *,
        top_k: int = 3,
        backend: str = "fts5",
        path: str | Path | None = None,
        snippet_chars: int | None = None,
        cache_size: int = 4096,
        timeout_s: float = 5.0,
    ) -> None:
        if backend == "fts5":
            index: _Index = _Fts5Index.build(documents, path)
        elif backend == "bm25s":
            if path is not None:
                raise ValueError('path= is only supported by backend="fts5"')
            index = _Bm25sIndex(documents)
        else:
            raise ValueError(f'unknown backend {backend!r}: expected "fts5" or "bm25s"')
        self._setup(index, top_k, snippet_chars, cache_size, timeout_s)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        top_k: int = 3,
        snippet_chars: int | None = None,
        cache_size: int = 4096,
        timeout_s: float = 5.0,
    ) -> SearchTool:
        """Reopen an on-disk index built by ``SearchTool(documents, path=path)``."""
        tool = cls.__new__(cls)
        tool._setup(_Fts5Index.open(path), top_k, snippet_chars, cache_size, timeout_s)
        return tool

    def _setup(
        self,
        index: _Index,
        top_k: int,
        snippet_chars: int | None,
        cache_size: int,
        timeout_s: float,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if snippet_chars is not None and snippet_chars < 1:
            raise ValueError(f"snippet_chars must be >= 1 or None, got {snippet_chars}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._index = index
        self.top_k = top_k
        self.snippet_chars = snippet_chars
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __len__(self) -> int:
        """Number of indexed documents."""
        return len(self._index)

    def search(self, query: str, k: int | None = None) -> list[tuple[Document, float]]:
        """Top ``k`` (default ``top_k``) documents with their BM25 scores, best first.
        Raises :class:`TimeoutError` past ``timeout_s``; never raises on query syntax."""
        k = self.top_k if k is None else k
        return self._index.search(query, k, time.monotonic() + self.timeout_s)

    def __call__(self, query: str) -> ToolOutput:
        """Run the tool: formatted top ``top_k`` documents, served from the cache when seen."""
        start = time.perf_counter()
        key = " ".join(query.lower().split())
        with self._cache_lock:
            text = self._cache.get(key)
            if text is not None:
                self._cache.move_to_end(key)
        if text is not None:
            return ToolOutput(text, ok=True, elapsed_s=time.perf_counter() - start, cached=True)
        try:
            hits = self.search(query)
        except TimeoutError:
            return self._error(f"timed out after {self.timeout_s:g} s", "timeout", start)
        except Exception as e:  # a broken index is an output too; the rollout goes on
            return self._error(f"{type(e).__name__}: {e}", "search_failed", start)
        text = format_results([doc for doc, _ in hits], self.snippet_chars)
        self._remember(key, text)
        return ToolOutput(text, ok=True, elapsed_s=time.perf_counter() - start)

    @staticmethod
    def _error(detail: str, error: str, start: float) -> ToolOutput:
        return ToolOutput(
            f"Search error: {detail}", ok=False, error=error, elapsed_s=time.perf_counter() - start
        )

    def _remember(self, key: str, text: str) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            self._cache[key] = text
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def close(self) -> None:
        """Close the index (the fts5 database connection)."""
        close = getattr(self._index, "close", None)
        if close is not None:
            close()


class HTTPSearchTool:
    """Client of a Search-R1-style retrieval server, as the ``search`` tool.

    POSTs ``{"queries": [query], "topk": k, "return_scores": true}`` to ``url`` (the server's
    ``/retrieve`` endpoint) and reads ``{"result": [[{"document": {"contents": "Title\\ntext"},
    "score": s}, ...]]}``. Stdlib only. HTTP errors, network errors, timeouts and malformed
    replies become ``ok=False`` outputs with ``Search error: ...`` text, never exceptions.
    ``timeout_s`` bounds connecting and each socket read, not the total of a trickling reply.
    """

    name = "search"

    def __init__(
        self, url: str, *, top_k: int = 3, timeout_s: float = 5.0, snippet_chars: int | None = None
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.url = url
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.snippet_chars = snippet_chars

    def search(self, query: str, k: int | None = None) -> list[tuple[Document, float]]:
        """Top ``k`` documents from the server. Raises ``OSError`` (network, HTTP status,
        timeout), ``http.client.HTTPException`` (a broken HTTP reply) or ``ValueError`` (a reply
        that is not the Search-R1 JSON shape)."""
        k = self.top_k if k is None else k
        body = json.dumps({"queries": [query], "topk": k, "return_scores": True}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
            payload = reply.read()
        try:
            results = json.loads(payload)["result"][0]
            return [_parse_hit(hit) for hit in results][:k]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed retrieval reply: {type(e).__name__}: {e}") from e

    def __call__(self, query: str) -> ToolOutput:
        """Run the tool: formatted documents, or an ``ok=False`` output naming the failure."""
        start = time.perf_counter()
        try:
            hits = self.search(query)
        except (OSError, ValueError, http.client.HTTPException) as e:
            error, detail = _classify_error(e)
            return ToolOutput(
                f"Search error: {detail}",
                ok=False,
                error=error,
                elapsed_s=time.perf_counter() - start,
            )
        text = format_results([doc for doc, _ in hits], self.snippet_chars)
        return ToolOutput(text, ok=True, elapsed_s=time.perf_counter() - start)


def _parse_hit(hit: Any) -> tuple[Document, float]:
    """One Search-R1 result: ``{"document": {...}, "score": s}``, or a bare document when the
    server ignores ``return_scores``."""
    doc, score = (hit["document"], float(hit["score"])) if "document" in hit else (hit, 0.0)
    return Document.from_contents(str(doc["contents"]), id=str(doc.get("id", ""))), score


def _classify_error(e: BaseException) -> tuple[str, str]:
    """(machine-readable error, human-readable detail) for a failed retrieval call."""
    if isinstance(e, urllib.error.HTTPError):
        return f"http_{e.code}", f"HTTP {e.code} {e.reason}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return "timeout", "timed out"
    if isinstance(e, http.client.HTTPException):
        return "bad_response", f"broken HTTP reply: {type(e).__name__}: {e}"
    if isinstance(e, ValueError):
        return "bad_response", str(e)
    return "network", str(reason)
