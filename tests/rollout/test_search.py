"""SearchTool (sqlite FTS5 BM25) and HTTPSearchTool (Search-R1 /retrieve client) on an
invented corpus whose near-duplicate titles act as hard negatives."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aepo.rollout.tools import Tool
from aepo.rollout.tools.search import (
    NO_RESULTS,
    Document,
    HTTPSearchTool,
    SearchTool,
    fts5_match_expression,
)

# (name, craft, band, lake): invented, so no model or web page knows the answers.
_ENTITIES = [
    ("Quorvath", "glassblowing", "Copper Lanterns", "Ashmere"),
    ("Zenlira", "lutemaking", "Night Orchard", "Dunlow"),
    ("Braskel", "cartography", "Salt Choir", "Frettle"),
    ("Orminde", "bookbinding", "Paper Comets", "Gorrin"),
    ("Tavessa", "clockmaking", "Iron Meadow", "Hasken"),
    ("Kelbrun", "weaving", "Velvet Tide", "Ibbleton"),
    ("Myrrow", "tanning", "Hollow Sparrows", "Jorvale"),
    ("Pellanor", "pottery", "Amber Static", "Kesswick"),
    ("Vintrasse", "enamelling", "Glass Harbor", "Lumbry"),
    ("Ulgareth", "ropemaking", "Quiet Engines", "Marrowdeep"),
]
_NAMES = [e[0] for e in _ENTITIES]


def make_corpus() -> list[Document]:
    """50 invented documents: for each of 10 names a city, a river, a song, a ship and a
    saint; the five share the name, so the titles are near-duplicates of one another."""
    docs = []
    for i, (name, craft, band, lake) in enumerate(_ENTITIES):
        docs += [
            Document(
                f"city-{i}",
                name,
                f"{name} is a harbour city known for its {craft} "
                f"guilds. Its mayor is elected every {i + 3} years.",
            ),
            Document(
                f"river-{i}",
                f"{name} River",
                f"The {name} River drains Lake {lake} and is {100 + 17 * i} kilometres long.",
            ),
            Document(
                f"song-{i}",
                f"{name} (song)",
                f"{name} is a song recorded by the band {band} in {1971 + i}.",
            ),
            Document(
                f"ship-{i}",
                f"HMS {name}",
                f"HMS {name} was a frigate launched in {1801 + i}; she carried {20 + 2 * i} guns.",
            ),
            Document(
                f"saint-{i}",
                f"Saint {name}",
                f"Saint {name} is the patron saint of {craft} and of travellers to Lake {lake}.",
            ),
        ]
    return docs


CORPUS = make_corpus()
BY_ID = {d.id: d for d in CORPUS}


@pytest.fixture(scope="module")
def tool() -> Iterator[SearchTool]:
    t = SearchTool(CORPUS, top_k=3)
    yield t
    t.close()


def test_implements_tool_protocol(tool):
    assert isinstance(tool, Tool) and tool.name == "search"
    assert len(tool) == len(CORPUS) == 50


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("which band recorded the song Zenlira", "song-1"),
        ("how long is the Braskel River", "river-2"),
        ("when was the frigate HMS Myrrow launched", "ship-6"),
        ("patron saint of Pellanor travellers", "saint-7"),
        ("harbour city Ulgareth mayor elected", "city-9"),
        ("Lake Dunlow drains river", "river-1"),
        ("guns carried by frigate Kelbrun", "ship-5"),
        ("zenlira SONG band", "song-1"),
        ("Tavessa clockmaking guilds harbour", "city-4"),
    ],
    ids=lambda v: v.replace(" ", "_") if isinstance(v, str) else None,
)
def test_targeted_query_ranks_right_doc_first(tool, query, expected):
    hits = tool.search(query, k=5)
    assert hits, f"no hits for {query!r}"
    ranked = [d.id for d, _ in hits]
    assert ranked[0] == expected, f"{query!r} ranked {ranked}"
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)


def test_hard_negatives_share_the_name(tool):
    """The target's near-duplicates (same name, other kinds) are the runners-up, ahead of
    the other rivers: they compete, and the target still wins."""
    ranked = [d.id for d, _ in tool.search("Zenlira River", k=6)]
    assert ranked[0] == "river-1"
    assert set(ranked[1:5]) == {f"{kind}-1" for kind in ("city", "song", "ship", "saint")}
    assert ranked[5].startswith("river-")


def test_output_text_format(tool):
    out = tool("how long is the Braskel River")
    assert out.ok and out.error is None and not out.cached
    lines = out.text.split("\n")
    assert len(lines) == 3
    assert lines[0] == f"Doc 1 (Braskel River): {BY_ID['river-2'].text}"
    assert lines[1].startswith("Doc 2 (") and lines[2].startswith("Doc 3 (")


@pytest.mark.parametrize(
    "query",
    [
        '"AND NEAR( * - : ) OR',
        "",
        "   ",
        "?!.,;:()[]{}*-+^\"'",
        "NEAR(Quorvath River, 2)",
        "title: Quorvath",
        "Quorvath*",
        "-Quorvath",
        '"unterminated Quorvath',
        "AND OR NOT",
        "Zürich Ωμέγα 北京 🚢",
        "Quorvath\x00River",
        "x" * 5000,
        " ".join(f"w{i}" for i in range(500)),
    ],
    ids=[
        "operators",
        "empty",
        "spaces",
        "punctuation",
        "near-call",
        "column-filter",
        "prefix",
        "negation",
        "open-quote",
        "bare-keywords",
        "unicode",
        "nul-byte",
        "very-long-word",
        "500-terms",
    ],
)
def test_query_syntax_never_raises(tool, query):
    out = tool(query)
    assert out.ok, out.text
    assert out.text == NO_RESULTS or out.text.startswith("Doc 1 (")


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", None), ("?!*", None), ("AND", '"AND"'), ('a"b', '"a" OR "b"'), ("x x X", '"x"')],
    ids=["empty", "punctuation", "keyword-quoted", "quote-splits", "dedup"],
)
def test_match_expression(query, expected):
    assert fts5_match_expression(query) == expected


def test_operator_words_are_searched_as_words():
    """``AND``/``NEAR`` in the query are plain terms: a document containing them is found."""
    docs = [*CORPUS, Document("ops", "Operators", "the words near and not appear here")]
    with_ops = SearchTool(docs)
    assert with_ops.search("NEAR AND NOT")[0][0].id == "ops"
    with_ops.close()


def test_no_match_gives_no_results(tool):
    assert tool("xylophone zeppelin").text == NO_RESULTS
    assert tool.search("xylophone zeppelin") == []


def test_cache_hit_sets_cached():
    tool = SearchTool(CORPUS, cache_size=2)
    first = tool("Braskel River length")
    again = tool("  braskel   RIVER length ")  # same normalised query
    assert not first.cached and again.cached
    assert again.text == first.text and again.ok
    tool("Zenlira song")
    tool("HMS Myrrow")  # evicts "braskel river length" (LRU, size 2)
    assert not tool("Braskel River length").cached
    assert tool("HMS Myrrow").cached


def test_cache_disabled():
    tool = SearchTool(CORPUS, cache_size=0)
    tool("Braskel River")
    assert not tool("Braskel River").cached


@pytest.mark.parametrize("top_k", [1, 2, 5, 50, 80], ids=lambda k: f"k{k}")
def test_top_k_respected(top_k):
    tool = SearchTool(CORPUS, top_k=top_k)
    lines = tool(
        "Quorvath Zenlira Braskel Orminde Tavessa Kelbrun Myrrow Pellanor Vintrasse Ulgareth"
    ).text.split("\n")
    assert len(lines) == min(top_k, 50)
    assert [line.split(" (")[0] for line in lines] == [f"Doc {i}" for i in range(1, len(lines) + 1)]
    assert len(tool.search("Quorvath", k=2)) == 2  # k overrides top_k


def test_snippet_chars_cuts_text():
    tool = SearchTool(CORPUS, top_k=1, snippet_chars=12)
    assert tool("Braskel River kilometres").text == "Doc 1 (Braskel River): The Braskel..."


def test_on_disk_index_reopens_with_same_results(tmp_path):
    path = tmp_path / "index.sqlite"
    built = SearchTool(CORPUS, path=path, top_k=4)
    queries = ["Braskel River", "song by Salt Choir", "frigate guns", "Zürich", ""]
    before = [(q, built.search(q), built(q).text) for q in queries]
    built.close()
    reopened = SearchTool.open(path, top_k=4)
    assert len(reopened) == len(CORPUS)
    assert [(q, reopened.search(q), reopened(q).text) for q in queries] == before
    reopened.close()
    with pytest.raises(FileExistsError):
        SearchTool(CORPUS, path=path)


def test_open_rejects_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        SearchTool.open(tmp_path / "missing.sqlite")
    foreign = tmp_path / "foreign.sqlite"
    foreign.write_bytes(b"not a database at all" * 10)
    with pytest.raises(ValueError, match="not a search index"):
        SearchTool.open(foreign)


def test_timeout_gives_error_output():
    """A deadline already past when sqlite first checks it: deterministic, no sleeping."""
    docs = [Document(str(i), f"Note {i}", f"common words in note {i}") for i in range(2000)]
    tool = SearchTool(docs, timeout_s=1e-9)
    out = tool("common words note")
    assert not out.ok and out.error == "timeout" and out.text.startswith("Search error:")
    assert not tool("common words note").cached
    with pytest.raises(TimeoutError):
        tool.search("common words note")


def test_closed_index_gives_error_output():
    tool = SearchTool(CORPUS)
    tool.close()
    out = tool("Braskel River")
    assert not out.ok and out.error == "search_failed" and out.text.startswith("Search error:")


def test_unknown_backend_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        SearchTool(CORPUS, backend="lucene")
    with pytest.raises(ValueError, match="top_k"):
        SearchTool(CORPUS, top_k=0)


def test_bm25s_backend_ranks_like_fts5():
    pytest.importorskip("bm25s")
    tool = SearchTool(CORPUS, backend="bm25s", top_k=1)
    assert tool.search("which band recorded the song Zenlira")[0][0].id == "song-1"
    assert tool('"AND NEAR( * - : ) OR').ok and tool("").text == NO_RESULTS


def test_bm25s_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # makes `import bm25s` fail
    with pytest.raises(ImportError, match="pip install bm25s"):
        SearchTool(CORPUS, backend="bm25s")


def test_many_queries_from_threads_all_answer(tool):
    """Throughput sanity (no timing assert): 4 threads x 200 queries, all answered right."""
    errors: list[str] = []

    def worker(offset: int) -> None:
        for j in range(200):
            i = (offset + j) % len(_NAMES)
            hits = tool.search(f"song {_NAMES[i]} band", k=1)
            if not hits or hits[0][0].id != f"song-{i}":
                errors.append(f"{_NAMES[i]}: {hits}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- HTTPSearchTool against a real Search-R1-style /retrieve server ---------------------


def _make_handler(index: SearchTool, stop: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/retrieve":
                result = [
                    [
                        {"document": {"id": d.id, "contents": d.contents}, "score": s}
                        for d, s in index.search(q, request["topk"])
                    ]
                    for q in request["queries"]
                ]
                self._send(200, json.dumps({"result": result}).encode())
            elif self.path == "/fail":
                self._send(500, b'{"detail": "index exploded"}')
            elif self.path == "/badjson":
                self._send(200, b'{"result": [[{"document": ')
            elif self.path == "/wrongshape":
                self._send(200, b'{"results": []}')
            elif self.path == "/slow":
                stop.wait(5.0)  # released at teardown
                with contextlib.suppress(OSError):  # the client gave up long ago
                    self._send(200, b'{"result": [[]]}')
            else:
                self._send(404, b"{}")

    return Handler


@pytest.fixture(scope="module")
def server(tool) -> Iterator[str]:
    stop = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(tool, stop))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.mark.parametrize(
    "query",
    ["which band recorded the song Zenlira", "Lake Dunlow drains river", '"AND NEAR( * - :', ""],
    ids=["song", "river", "operators", "empty"],
)
def test_http_client_matches_local_search(tool, server, query):
    client = HTTPSearchTool(f"{server}/retrieve", top_k=3)
    assert isinstance(client, Tool)
    out = client(query)
    assert out.ok, out.text
    assert out.text == tool(query).text
    assert [(d.id, d.title, d.text) for d, _ in client.search(query)] == [
        (d.id, d.title, d.text) for d, _ in tool.search(query)
    ]


@pytest.mark.parametrize(
    ("endpoint", "error"),
    [
        ("/fail", "http_500"),
        ("/nowhere", "http_404"),
        ("/badjson", "bad_response"),
        ("/wrongshape", "bad_response"),
        ("/slow", "timeout"),
    ],
    ids=["500", "404", "invalid-json", "wrong-shape", "timeout"],
)
def test_http_errors_become_outputs(server, endpoint, error):
    client = HTTPSearchTool(f"{server}{endpoint}", timeout_s=0.3)
    start = time.monotonic()
    out = client("Braskel River")
    assert time.monotonic() - start < 3.0  # the /slow server would hold us 5 s
    assert not out.ok and out.error == error
    assert out.text.startswith("Search error: ")


def test_http_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = HTTPSearchTool(f"http://127.0.0.1:{port}/retrieve", timeout_s=1.0)("x")
    assert not out.ok and out.error == "network" and out.text.startswith("Search error: ")


@pytest.mark.parametrize(
    ("contents", "title", "text"),
    [
        ('"Paris"\nParis is the capital.', "Paris", "Paris is the capital."),
        ("Paris\nline one\nline two", "Paris", "line one\nline two"),
        ("Only a title", "Only a title", ""),
    ],
    ids=["quoted-title", "multi-line", "title-only"],
)
def test_document_from_contents(contents, title, text):
    doc = Document.from_contents(contents, id="7")
    assert (doc.id, doc.title, doc.text) == ("7", title, text)
