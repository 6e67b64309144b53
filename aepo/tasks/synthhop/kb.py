"""SynthHop's knowledge base: invented entities and facts, one document per entity, questions
rendered from relation paths (1 to 3 hops), a train/eval split by subject entity, and gold
search trajectories for cold-start SFT.

Names are 2-3 syllables from a fixed inventory, so no pretrained model knows the answers and a
held-out name is a new arrangement of familiar syllables. Some names differ from another name of
the same kind in one syllable only, and every document states one distractor fact (a city the
person "visited", a "partner" company), often about such a near-duplicate: hard negatives.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aepo.rollout.rewards import check_format, exact_match, extract_answer
from aepo.rollout.tools.search import Document, SearchTool
from aepo.tasks.synthhop.templates import (
    ANSWER,
    DISTRACTORS,
    DOC_TEMPLATES,
    KINDS,
    PROMPT,
    QUESTION_TYPES,
    RELATIONS,
    RESULT_CLOSE,
    RESULT_OPEN,
    SEARCH_CALL,
    SYLLABLES,
    QuestionType,
    template_words,
)

SPLITS = ("train", "eval")
QUESTION_TYPE = {q.name: q for q in QUESTION_TYPES}
_TEXT_WORD = re.compile(r"\w+")
_GOLD_CALL = re.compile(
    r"<search>(.*?)</search>" + re.escape(RESULT_OPEN) + r"(.*?)" + re.escape(RESULT_CLOSE), re.S
)


@dataclass(frozen=True)
class KBConfig:
    """The size and randomness of a SynthHop knowledge base."""

    seed: int = 0  # every draw (names, facts, templates, split, phrasings) derives from it
    countries: int = 20  # number of countries (answers only, never question subjects)
    cities: int = 150  # number of cities
    persons: int = 2000  # number of persons
    companies: int = 1000  # number of companies
    three_syllable_frac: float = 0.7  # share of fresh names with 3 syllables (the rest have 2)
    near_duplicate_frac: float = 0.25  # share of names: a same-kind name, 1 syllable changed
    sibling_distractor_frac: float = 0.5  # chance a distractor is a near-duplicate, when one exists
    eval_frac: float = 0.2  # share of cities, persons and companies held out as eval subjects
    top_k: int = 1  # documents per search result (the subject's own document always ranks first)

    def __post_init__(self) -> None:
        if min(self.count(kind) for kind in KINDS) < 1:
            raise ValueError("need at least one entity of each kind")
        if min(self.countries, self.cities, self.companies) < 2:
            raise ValueError("need >= 2 countries, cities and companies (distractors differ)")
        for name in ("three_syllable_frac", "near_duplicate_frac", "sibling_distractor_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.eval_frac < 1.0:
            raise ValueError(f"eval_frac must be in (0, 1), got {self.eval_frac}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def count(self, kind: str) -> int:
        """Number of entities of ``kind``."""
        return {
            "country": self.countries,
            "city": self.cities,
            "person": self.persons,
            "company": self.companies,
        }[kind]


def _rng(config: KBConfig, phase: str) -> random.Random:
    """One independent stream per build phase (str seeds hash with sha512: stable across runs)."""
    return random.Random(f"synthhop:{config.seed}:{phase}")


def _make_names(
    config: KBConfig,
) -> tuple[dict[str, list[str]], dict[str, tuple[str, ...]], dict[str, list[str]]]:
    """(kind -> names in creation order, name -> syllables, name -> same-kind near-duplicates)."""
    rng = _rng(config, "names")
    reserved = set(template_words())
    used: set[str] = set()
    names: dict[str, list[str]] = {}
    syllables: dict[str, tuple[str, ...]] = {}
    siblings: dict[str, list[str]] = {}
    for kind in KINDS:
        names[kind], long_names = [], []
        while len(names[kind]) < config.count(kind):
            base = None
            if long_names and rng.random() < config.near_duplicate_frac:
                base = rng.choice(long_names)
                parts = list(syllables[base])
                parts[rng.randrange(3)] = rng.choice(SYLLABLES)
            else:
                n = 3 if rng.random() < config.three_syllable_frac else 2
                parts = [rng.choice(SYLLABLES) for _ in range(n)]
            name = "".join(parts)
            if name in used or name in reserved:
                continue
            used.add(name)
            names[kind].append(name)
            syllables[name] = tuple(parts)
            siblings[name] = []
            if len(parts) == 3:
                long_names.append(name)
            if base is not None:
                siblings[base].append(name)
                siblings[name].append(base)
    return names, syllables, siblings


def _make_facts(
    config: KBConfig, names: Mapping[str, list[str]], siblings: Mapping[str, list[str]]
) -> dict[str, dict[str, str]]:
    """relation -> subject -> object, for the true relations and the distractor relations."""
    rng = _rng(config, "facts")
    countries, cities = names["country"], names["city"]
    facts: dict[str, dict[str, str]] = {r: {} for r in RELATIONS}
    for i, city in enumerate(cities):  # every country gets a city before any gets a second one
        facts["located_in"][city] = countries[i] if i < len(countries) else rng.choice(countries)
    for person in names["person"]:
        facts["born_in"][person] = rng.choice(cities)
    for company in names["company"]:
        facts["founded_by"][company] = rng.choice(names["person"])
        facts["headquartered_in"][company] = rng.choice(cities)

    # The distractor must differ from ``avoid`` (the true object, or the entity itself), and is
    # often a near-duplicate of it; siblings share a kind, so they come from the right pool.
    true_object = {"city": "located_in", "person": "born_in"}
    for kind, (relation, other_kind) in DISTRACTORS.items():
        facts[relation] = {}
        for name in names[kind]:
            avoid = facts[true_object[kind]][name] if kind in true_object else name
            if siblings[avoid] and rng.random() < config.sibling_distractor_frac:
                facts[relation][name] = rng.choice(siblings[avoid])
                continue
            while (pick := rng.choice(names[other_kind])) == avoid:
                pass
            facts[relation][name] = pick
    return facts


def _make_documents(
    config: KBConfig, names: Mapping[str, list[str]], facts: Mapping[str, dict[str, str]]
) -> list[Document]:
    """One document per entity (countries, cities, persons, companies), title = name."""
    rng = _rng(config, "documents")
    docs = []
    for kind in KINDS:
        fields_of = [(field, facts[r]) for r, (k, _, field) in RELATIONS.items() if k == kind]
        other = facts[DISTRACTORS[kind][0]]
        for i, name in enumerate(names[kind]):
            fields = {field: rel[name] for field, rel in fields_of}
            text = rng.choice(DOC_TEMPLATES[kind]).format(s=name, other=other[name], **fields)
            docs.append(Document(id=f"{kind}-{i}", title=name, text=text))
    return docs


def _make_split(config: KBConfig, names: Mapping[str, list[str]]) -> frozenset[str]:
    """The held-out (eval) subjects: ``eval_frac`` of each question-subject kind."""
    rng = _rng(config, "split")
    held = []
    for kind in sorted({q.subject_kind for q in QUESTION_TYPES}):
        order = list(names[kind])
        rng.shuffle(order)
        held += order[: max(1, round(config.eval_frac * len(order)))]
    return frozenset(held)


def _make_questions(
    config: KBConfig,
    names: Mapping[str, list[str]],
    facts: Mapping[str, dict[str, str]],
    held_out: frozenset[str],
) -> list[dict[str, Any]]:
    """Every (question type, subject) pair once, by type then subject creation order."""
    rng = _rng(config, "questions")
    questions = []
    for qtype in QUESTION_TYPES:
        for subject in names[qtype.subject_kind]:
            path = [subject]
            for relation in qtype.relations:
                path.append(facts[relation][path[-1]])
            question = rng.choice(qtype.phrasings).format(s=subject)
            questions.append(
                {
                    "id": f"{qtype.name}:{subject}",
                    "prompt": PROMPT.format(question=question),
                    "question": question,
                    "answers": [path[-1]],
                    "hops": qtype.hops,
                    "type": qtype.name,
                    "subject": subject,
                    "path": path,
                    "split": "eval" if subject in held_out else "train",
                }
            )
    return questions


class SynthHop:
    """A built knowledge base: documents, facts, questions and the search tool over them.

    Build with :meth:`build`; the same config (seed included) gives identical documents,
    questions and order. Question records are dicts with ``prompt`` (the text the model is
    given), ``answers``, ``hops``, ``type``, ``subject``, ``path`` (subject -> ... -> answer),
    ``question``, ``id`` and ``split``; treat them as read-only.
    """

    def __init__(
        self,
        config: KBConfig,
        names: dict[str, list[str]],
        syllables: dict[str, tuple[str, ...]],
        siblings: dict[str, list[str]],
        facts: dict[str, dict[str, str]],
        documents: list[Document],
        held_out: frozenset[str],
        questions: list[dict[str, Any]],
    ) -> None:
        self.config = config
        self.names = names  # kind -> entity names, in creation order
        self.syllables = syllables  # name -> its syllables
        self.siblings = siblings  # name -> same-kind names differing in one syllable
        self.facts = facts  # relation (true or distractor) -> subject -> object
        self.documents = documents  # one per entity, countries then cities, persons, companies
        self.held_out = held_out  # eval subjects
        self._questions = questions
        self.kind = {n: k for k, ns in names.items() for n in ns}  # name -> kind
        self._doc = {d.title: d for d in documents}
        self._tool: SearchTool | None = None

    @classmethod
    def build(cls, config: KBConfig = KBConfig()) -> SynthHop:
        """Generate the knowledge base described by ``config``."""
        names, syllables, siblings = _make_names(config)
        facts = _make_facts(config, names, siblings)
        documents = _make_documents(config, names, facts)
        held_out = _make_split(config, names)
        questions = _make_questions(config, names, facts, held_out)
        return cls(config, names, syllables, siblings, facts, documents, held_out, questions)

    def questions(
        self,
        split: str,
        hops: int | Iterable[int] | None = None,
        types: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Questions of ``split`` ("train" or "eval"), optionally only those with the given hop
        count(s) and type name(s), in a fixed order (by type, then subject)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        hop_set = {hops} if isinstance(hops, int) else None if hops is None else set(hops)
        type_set = None if types is None else set(types)
        if type_set is not None and (unknown := type_set - set(QUESTION_TYPE)):
            raise ValueError(f"unknown question types {sorted(unknown)}")
        return [
            q
            for q in self._questions
            if q["split"] == split
            and (hop_set is None or q["hops"] in hop_set)
            and (type_set is None or q["type"] in type_set)
        ]

    def document(self, name: str) -> Document:
        """The document of entity ``name``."""
        return self._doc[name]

    @property
    def syllable_inventory(self) -> tuple[str, ...]:
        """The syllables every name is made of."""
        return SYLLABLES

    def words(self) -> tuple[str, ...]:
        """Every whole word and punctuation mark of the fixed text (names excluded)."""
        return template_words()

    def search_tool(self, top_k: int | None = None, **kwargs: Any) -> SearchTool:
        """A fresh :class:`SearchTool` over the documents (``top_k`` defaults to the config's);
        the rollout and :meth:`gold_response` use the same settings."""
        top_k = self.config.top_k if top_k is None else top_k
        return SearchTool(self.documents, top_k=top_k, **kwargs)

    @property
    def tool(self) -> SearchTool:
        """The search tool :meth:`gold_response` uses (``search_tool()``, built once)."""
        if self._tool is None:
            self._tool = self.search_tool()
        return self._tool

    def gold_response(self, question: Mapping[str, Any]) -> str:
        """The ideal response to ``question`` (everything after the prompt): one search per hop
        for the entity the path has reached, each followed by the tool's result exactly as the
        rollout inserts it, then the answer."""
        parts = []
        for entity in question["path"][:-1]:
            text = self.tool(entity).text
            parts.append(SEARCH_CALL.format(query=entity) + RESULT_OPEN + text + RESULT_CLOSE)
        parts.append(ANSWER.format(answer=question["answers"][0]))
        return "".join(parts)


def gold_defect(
    kb: SynthHop, question: Mapping[str, Any], response: str, tool: SearchTool | None = None
) -> str | None:
    """Why ``response`` is not a valid gold trajectory for ``question``, or ``None`` if it is.

    Valid: well-formed; one search per hop, hop i searching path[i] and its result containing
    path[i]'s full document, which states the hop's fact (path[i] -relation-> path[i+1]); each
    result is what ``tool`` (default: ``kb.tool``) returns for that query; the answer is an
    exact match.
    """
    ok, reason = check_format(response, ("search",))
    if not ok:
        return f"format: {reason}"
    qtype: QuestionType = QUESTION_TYPE[question["type"]]
    path, calls = question["path"], _GOLD_CALL.findall(response)
    if len(calls) != qtype.hops or len(path) != qtype.hops + 1:
        return f"{len(calls)} searches and a path of {len(path)} for {qtype.hops} hops"
    tool = tool if tool is not None else kb.tool
    for hop, ((query, result), relation) in enumerate(zip(calls, qtype.relations, strict=True)):
        entity, obj = path[hop], path[hop + 1]
        if query.strip() != entity:
            return f"hop {hop + 1} searched {query.strip()!r} instead of {entity!r}"
        doc = kb.document(entity)
        if kb.facts[relation].get(entity) != obj or obj not in _TEXT_WORD.findall(doc.text):
            return f"hop {hop + 1}: {entity!r} -{relation}-> {obj!r} is not in its document"
        line = re.compile(rf"Doc \d+ \({re.escape(doc.title)}\): {re.escape(doc.text)}")
        if not any(line.fullmatch(text) for text in result.split("\n")):
            return f"hop {hop + 1}: the result lacks the document of {entity!r}"
        if result != tool(query).text:
            return f"hop {hop + 1}: the result is not the search tool's output"
    if exact_match(extract_answer(response), question["answers"]) != 1.0:
        return f"wrong answer {extract_answer(response)!r}, expected {question['answers']}"
    return None


def validate_gold(
    kb: SynthHop, question: Mapping[str, Any], response: str, tool: SearchTool | None = None
) -> bool:
    """Is ``response`` a valid gold trajectory for ``question``? (see :func:`gold_defect`)."""
    return gold_defect(kb, question, response, tool) is None
