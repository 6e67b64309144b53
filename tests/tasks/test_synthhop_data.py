"""SynthHop's data side: the generated knowledge base, the subject split, gold search
trajectories (checked against the real search tool) and the syllable-level tokenizer."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import time
from collections import Counter

import pytest

from aepo.models import TAGS
from aepo.rollout.tools.search import _FTS_TOKENIZER
from aepo.tasks.synthhop import (
    QUESTION_TYPES,
    KBConfig,
    SynthHop,
    build_tokenizer,
    gold_defect,
    validate_gold,
)
from aepo.tasks.synthhop.templates import (
    DISTRACTORS,
    DOC_TEMPLATES,
    KINDS,
    RELATIONS,
    RESULT_CLOSE,
    RESULT_OPEN,
    SYLLABLES,
)
from aepo.tasks.synthhop.tokenizer import CONTINUATION

SMALL = KBConfig(seed=3, countries=3, cities=6, persons=40, companies=20)


@pytest.fixture(scope="module")
def kb() -> SynthHop:
    start = time.perf_counter()
    built = SynthHop.build()
    print(f"\nSynthHop.build() (default config): {time.perf_counter() - start:.3f} s")
    return built


@pytest.fixture(scope="module")
def tool(kb):
    return kb.search_tool()


@pytest.fixture(scope="module")
def tok(kb):
    return build_tokenizer(kb)


def _subjects(kb: SynthHop, split: str) -> set[str]:
    return {q["subject"] for q in kb.questions(split)}


# ---- the knowledge base


def test_config_rejects_bad_values():
    for bad in (
        {"eval_frac": 0.0},
        {"eval_frac": 1.0},
        {"near_duplicate_frac": 1.5},
        {"top_k": 0},
        {"countries": 1},
        {"persons": 0},
    ):
        with pytest.raises(ValueError):
            KBConfig(**bad)


def test_same_seed_same_kb_other_seed_other_kb(kb):
    again = SynthHop.build(KBConfig())
    assert again.documents == kb.documents
    assert again.questions("train") == kb.questions("train")
    assert again.questions("eval") == kb.questions("eval")
    other = SynthHop.build(KBConfig(seed=1))
    assert other.documents != kb.documents
    assert [q["prompt"] for q in other.questions("eval")] != [
        q["prompt"] for q in kb.questions("eval")
    ]


def test_names_are_unique_syllable_words(kb):
    config = kb.config
    assert {k: len(v) for k, v in kb.names.items()} == {k: config.count(k) for k in KINDS}
    names = [n for k in KINDS for n in kb.names[k]]
    assert len(set(names)) == len(names)
    inventory = set(SYLLABLES)
    for name in names:
        parts = kb.syllables[name]
        assert 2 <= len(parts) <= 3 and set(parts) <= inventory and "".join(parts) == name
    assert 30 <= len(SYLLABLES) <= 40 and all(re.fullmatch(r"[a-z]{2}", s) for s in SYLLABLES)
    assert not set(names) & set(kb.words())


def test_near_duplicate_names_share_all_but_one_syllable(kb):
    pairs = [(a, b) for a, sibs in kb.siblings.items() for b in sibs]
    assert len({a for a, _ in pairs}) >= 0.1 * len(kb.kind)
    for a, b in pairs:
        sa, sb = kb.syllables[a], kb.syllables[b]
        assert kb.kind[a] == kb.kind[b] and len(sa) == len(sb) == 3
        assert sum(x != y for x, y in zip(sa, sb, strict=True)) == 1


def test_one_document_per_entity_stating_its_facts(kb):
    assert [d.title for d in kb.documents] == [n for k in KINDS for n in kb.names[k]]
    assert len({d.id for d in kb.documents}) == len(kb.documents)
    templates_used = Counter()
    for doc in kb.documents:
        kind, words = kb.kind[doc.title], set(re.findall(r"\w+", doc.text))
        assert doc.text == doc.text.lower() and "\n" not in doc.text
        for relation, (subject_kind, object_kind, _) in RELATIONS.items():
            if subject_kind == kind:
                obj = kb.facts[relation][doc.title]
                assert kb.kind[obj] == object_kind and obj in words
        distractor, other_kind = DISTRACTORS[kind]
        other = kb.facts[distractor][doc.title]
        assert kb.kind[other] == other_kind and other in words
        assert other not in (doc.title, kb.facts.get("born_in", {}).get(doc.title))
        assert other != kb.facts["located_in"].get(doc.title)
        shape = re.sub(r"\w+", lambda m: "N" if m.group() in kb.kind else m.group(), doc.text)
        templates_used[kind, shape] += 1
    for kind in KINDS:  # every paraphrase is in use
        assert len([k for k in templates_used if k[0] == kind]) == len(DOC_TEMPLATES[kind])


def test_distractors_are_often_near_duplicates(kb):
    visited = kb.facts["visited"]
    close = sum(visited[p] in kb.siblings[kb.facts["born_in"][p]] for p in kb.names["person"])
    assert close >= 50


def test_every_name_is_its_own_search_term(kb):
    """Porter stemming in the index must not merge two names (or change one)."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(title, tokenize='{_FTS_TOKENIZER}')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'row')")
    conn.executemany("INSERT INTO t(title) VALUES (?)", [(n,) for n in kb.kind])
    terms = {row[0] for row in conn.execute("SELECT term FROM v")}
    assert terms == set(kb.kind)


def test_searching_a_name_ranks_its_document_first(kb, tool):
    for name in kb.kind:
        hits = tool.search(name, k=2)
        assert hits[0][0].title == name, name


# ---- questions and the split


def test_split_is_by_subject(kb):
    train, held = _subjects(kb, "train"), _subjects(kb, "eval")
    assert train and held and not train & held
    assert held <= kb.held_out
    for kind in ("city", "person", "company"):
        share = len(set(kb.names[kind]) & held) / kb.config.count(kind)
        assert share == pytest.approx(kb.config.eval_frac, abs=0.01)
    assert all(q["split"] == split for split in ("train", "eval") for q in kb.questions(split))


def test_eval_has_enough_questions_per_hop_count(kb):
    counts = Counter(q["hops"] for q in kb.questions("eval"))
    print(f"\neval questions per hop count: {dict(sorted(counts.items()))}")
    assert counts[1] >= 300 and counts[2] >= 300 and counts[3] > 0


def test_question_records_follow_their_paths(kb):
    qtypes = {q.name: q for q in QUESTION_TYPES}
    for split in ("train", "eval"):
        questions = kb.questions(split)
        assert {q["type"] for q in questions} == set(qtypes)
        for q in questions:
            qtype = qtypes[q["type"]]
            assert q["hops"] == qtype.hops == len(q["path"]) - 1
            assert q["path"][0] == q["subject"] and q["answers"] == [q["path"][-1]]
            assert kb.kind[q["subject"]] == qtype.subject_kind
            hops = zip(q["path"][:-1], q["path"][1:], strict=True)
            for relation, (a, b) in zip(qtype.relations, hops, strict=True):
                assert kb.facts[relation][a] == b
            assert q["prompt"] == f"question: {q['question']}\n"
            assert q["subject"] in q["question"].split(" ") or f"{q['subject']}?" in q["question"]


def test_question_filters(kb):
    two_hop = kb.questions("eval", hops=2)
    assert two_hop and all(q["hops"] == 2 for q in two_hop)
    assert kb.questions("eval", hops=[1, 2]) == [q for q in kb.questions("eval") if q["hops"] < 3]
    born = kb.questions("train", types=["born"])
    assert born and {q["type"] for q in born} == {"born"}
    assert kb.questions("eval", hops=1, types=["founder_born"]) == []
    with pytest.raises(ValueError):
        kb.questions("test")
    with pytest.raises(ValueError):
        kb.questions("train", types=["nope"])


# ---- gold trajectories


def test_gold_trajectories_are_valid(kb, tool):
    questions = kb.questions("train", hops=[1, 2]) + kb.questions("train", hops=3)[::4]
    questions += kb.questions("eval")[::10]
    for q in questions:
        response = kb.gold_response(q)
        assert gold_defect(kb, q, response, tool) is None, (q, response)
        assert response.count("<search>") == q["hops"]


def test_gold_with_two_documents_per_search():
    kb2 = SynthHop.build(dataclasses.replace(KBConfig(), top_k=2))
    tool = kb2.search_tool()
    for q in kb2.questions("train")[::25]:
        assert validate_gold(kb2, q, kb2.gold_response(q), tool)


def test_small_kb_builds_and_its_gold_is_valid():
    small = SynthHop.build(SMALL)
    assert len(small.documents) == 69
    for q in small.questions("train") + small.questions("eval"):
        assert validate_gold(small, q, small.gold_response(q))


def test_gold_response_has_the_rollout_protocol(kb):
    q = kb.questions("eval", types=["founder_born"])[0]
    founder, city = q["path"][1], q["answers"][0]
    response = kb.gold_response(q)
    expected = re.compile(
        rf"<search> {q['subject']} </search>{RESULT_OPEN}Doc 1 \({q['subject']}\): [^\n]+"
        rf"{RESULT_CLOSE}<search> {founder} </search>{RESULT_OPEN}Doc 1 \({founder}\): [^\n]+"
        rf"{RESULT_CLOSE}<answer> {city} </answer>"
    )
    assert expected.fullmatch(response), response


def test_gold_check_rejects_broken_trajectories(kb, tool):
    q = kb.questions("train", types=["founder_born"])[0]
    good = kb.gold_response(q)
    _, founder, city = q["path"]
    near = next(n for n in kb.names["city"] if n != city)
    wrong_search = good.replace(f"<search> {founder} </search>", f"<search> {city} </search>")
    broken = {
        "wrong answer": good.replace(f"<answer> {city} ", f"<answer> {near} "),
        "no answer": good[: good.index("<answer>")],
        "one hop skipped": good[good.index(RESULT_CLOSE) + len(RESULT_CLOSE) :],
        "wrong entity searched": wrong_search,
        "made-up result": good.replace(kb.document(founder).text, f"{founder} was born in {city}."),
        "result of another tool": good.replace("Doc 1 (", "Doc 2 ("),
    }
    for what, response in broken.items():
        assert gold_defect(kb, q, response, tool) is not None, what
        assert not validate_gold(kb, q, response, tool), what


def test_gold_check_rejects_a_question_whose_path_is_wrong(kb, tool):
    q = dict(kb.questions("train", types=["born"])[0])
    other = next(c for c in kb.names["city"] if c != q["answers"][0])
    q["path"], q["answers"] = [q["subject"], other], [other]
    response = kb.gold_response(q)
    assert gold_defect(kb, q, response, tool) is not None


# ---- tokenizer


def _generated_texts(kb: SynthHop) -> list[str]:
    """Documents, all prompts, tool outputs and a sample of full gold trajectories."""
    tool = kb.search_tool(top_k=3)
    texts = [d.text for d in kb.documents] + [tool(d.title).text for d in kb.documents[::7]]
    questions = kb.questions("train") + kb.questions("eval")
    texts += [q["prompt"] for q in questions]
    texts += [q["prompt"] + kb.gold_response(q) for q in questions[::5]]
    texts += [tool("zzz").text, "Search error: timed out after 5 s"]
    return texts


def test_vocabulary_is_small_with_tags_as_plain_tokens(tok):
    print(f"\nSynthHop vocabulary: {len(tok)} tokens")
    assert 150 <= len(tok) <= 300
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    for tag in TAGS:
        (tag_id,) = tok.encode(tag, add_special_tokens=False)
        assert tok.decode([tag_id], skip_special_tokens=True) == tag
        assert tag not in tok.all_special_tokens
    ids = tok.encode("question: who founded kora?")
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]


def test_round_trip_without_unknown_tokens(kb, tok):
    texts = _generated_texts(kb)
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded, strict=True):
        assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
    with_bos = tok.encode(texts[-3])
    assert tok.decode(with_bos, skip_special_tokens=True) == texts[-3]


def test_result_wrapper_tokens(tok):
    for wrapper, tag in ((RESULT_OPEN, "<result>"), (RESULT_CLOSE, "</result>")):
        ids = tok.encode(wrapper, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == ["\n", tag, "\n"]
        assert tok.decode(ids) == wrapper


def test_gold_ids_equal_the_rollouts_piecewise_ids(kb, tok):
    """The rollout encodes the prompt, sampled calls and wrapped tool results separately; the
    SFT text encoded whole must give the same ids."""
    tool = kb.search_tool()
    for q in kb.questions("train", hops=[2, 3])[::200]:
        response = kb.gold_response(q)
        pieces = [tok.encode(q["prompt"])]
        for entity in q["path"][:-1]:
            pieces.append(tok.encode(f"<search> {entity} </search>", add_special_tokens=False))
            pieces.append(tok.encode(RESULT_OPEN, add_special_tokens=False))
            pieces.append(tok.encode(tool(entity).text, add_special_tokens=False))
            pieces.append(tok.encode(RESULT_CLOSE, add_special_tokens=False))
        pieces.append(tok.encode(f"<answer> {q['answers'][0]} </answer>", add_special_tokens=False))
        assert tok.encode(q["prompt"] + response) == [i for p in pieces for i in p]


def test_names_tokenise_into_syllables_seen_in_training(kb, tok):
    def pieces(name: str) -> list[str]:
        first, *rest = kb.syllables[name]
        return [first, *(CONTINUATION + s for s in rest)]

    encoded = tok(list(kb.kind), add_special_tokens=False)["input_ids"]
    for name, ids in zip(kb.kind, encoded, strict=True):
        assert tok.convert_ids_to_tokens(ids) == pieces(name), name
    trained = {p for s in _subjects(kb, "train") for p in pieces(s)}
    for subject in _subjects(kb, "eval"):
        assert set(pieces(subject)) <= trained, subject


def test_incremental_decoding_only_appends(kb, tok):
    """vLLM detokenizes with ``DecodeStream``, which fails if a new token rewrites old text."""
    from tokenizers.decoders import DecodeStream

    q = kb.questions("eval", hops=3)[0]
    text = q["prompt"] + kb.gold_response(q)
    stream, out = DecodeStream(skip_special_tokens=True), []
    for token_id in tok.encode(text):
        piece = stream.step(tok._tokenizer, token_id)
        out.append(piece or "")
    assert "".join(out) == text


def test_saved_tokenizer_loads_back(kb, tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    q = kb.questions("eval", hops=2)[0]
    text = q["prompt"] + kb.gold_response(q)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == text
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (
        tok.pad_token,
        tok.bos_token,
        tok.eos_token,
    )


def test_gold_trajectory_lengths(kb, tok):
    lengths = {}
    for hops in (1, 2, 3):
        texts = [q["prompt"] + kb.gold_response(q) for q in kb.questions("train", hops=hops)]
        lengths[hops] = max(len(ids) for ids in tok(texts)["input_ids"])
    print(f"\nlongest gold trajectory (tokens, with <|bos|>) per hop count: {lengths}")
    assert lengths[3] <= 160
