"""The fixed text of SynthHop: the syllable inventory names are built from, one paraphrase set
per document kind, the question types with their phrasings, and the prompt/response protocol.

Text is lower-case with natural punctuation ("born in lumeta."), the same convention as the
search tool's own output (``Doc 1 (lumeta): ...``, ``No results.``), so that the tokenizer
round-trips every string exactly (see ``tokenizer.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Consonant + vowel. No "e", "y", "t" or "g": Porter stemming (the search index's tokenizer)
# rewrites endings such as "-e", "-eli", "-iti", "-logi", so with these letters two names could
# share one index term. With this inventory every name is its own term.
CONSONANTS = "bdklmnprsv"
VOWELS = "aiou"
SYLLABLES: tuple[str, ...] = tuple(c + v for c in CONSONANTS for v in VOWELS)  # 40

KINDS = ("country", "city", "person", "company")

# One document per entity, from one of these paraphrases (the choice is seeded). Each names the
# true facts and one distractor of a confusable type ("visited" city, "partner" company, ...).
DOC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "country": (
        "{s} is a country that borders {other}.",
        "the country of {s} borders {other}.",
        "{s} is a nation next to {other}.",
    ),
    "city": (
        "{s} is a city in {country} that trades with {other}.",
        "the city of {s} is located in {country} and trades with {other}.",
        "{s} trades with {other} and lies in the country of {country}.",
    ),
    "person": (
        "{s} was born in {born} and later visited {other}.",
        "the birthplace of {s} is {born}. {s} has visited {other}.",
        "{s} visited {other} once, but was born in the city of {born}.",
    ),
    "company": (
        "{s} was founded by {founder} and is headquartered in {hq}. it is a partner of {other}.",
        "the company {s}, a partner of {other}, was founded by {founder} and is based in {hq}.",
        "{s} is headquartered in {hq}. its founder is {founder}, and it works with {other}.",
    ),
}

# Relation -> (subject kind, object kind, template field holding the object).
RELATIONS: dict[str, tuple[str, str, str]] = {
    "located_in": ("city", "country", "country"),
    "born_in": ("person", "city", "born"),
    "founded_by": ("company", "person", "founder"),
    "headquartered_in": ("company", "city", "hq"),
}
# Distractor relation per kind: the "{other}" field, an entity of the given kind.
DISTRACTORS: dict[str, tuple[str, str]] = {
    "country": ("borders", "country"),
    "city": ("trades_with", "country"),
    "person": ("visited", "city"),
    "company": ("partner_of", "company"),
}


@dataclass(frozen=True)
class QuestionType:
    """A relation path from a subject kind to the answer, with its question phrasings."""

    name: str
    subject_kind: str  # kind of the entity the question names
    relations: tuple[str, ...]  # followed in order; hops = len(relations)
    phrasings: tuple[str, ...]  # "{s}" is the subject's name

    @property
    def hops(self) -> int:
        return len(self.relations)


QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType(
        "born",
        "person",
        ("born_in",),
        ("where was {s} born?", "in which city was {s} born?", "what is the birthplace of {s}?"),
    ),
    QuestionType(
        "country_of_city",
        "city",
        ("located_in",),
        (
            "in which country is {s}?",
            "which country is the city of {s} in?",
            "{s} is a city in which country?",
        ),
    ),
    QuestionType(
        "founder",
        "company",
        ("founded_by",),
        ("who founded {s}?", "who is the founder of {s}?", "{s} was founded by whom?"),
    ),
    QuestionType(
        "hq",
        "company",
        ("headquartered_in",),
        (
            "where is {s} headquartered?",
            "in which city is {s} based?",
            "where are the headquarters of {s}?",
        ),
    ),
    QuestionType(
        "birth_country",
        "person",
        ("born_in", "located_in"),
        (
            "in which country was {s} born?",
            "what is the country of birth of {s}?",
            "{s} was born in which country?",
        ),
    ),
    QuestionType(
        "hq_country",
        "company",
        ("headquartered_in", "located_in"),
        (
            "in which country is {s} headquartered?",
            "in which country is {s} based?",
            "the headquarters of {s} are in which country?",
        ),
    ),
    QuestionType(
        "founder_born",
        "company",
        ("founded_by", "born_in"),
        (
            "where was the founder of {s} born?",
            "in which city was the founder of {s} born?",
            "what is the birthplace of the founder of {s}?",
        ),
    ),
    QuestionType(
        "founder_country",
        "company",
        ("founded_by", "born_in", "located_in"),
        (
            "in which country was the founder of {s} born?",
            "what is the country of birth of the founder of {s}?",
            "the founder of {s} was born in which country?",
        ),
    ),
)

# The protocol. The rollout inserts a tool's output as RESULT_OPEN + text + RESULT_CLOSE right
# after the policy's closing tool tag (aepo.rollout.tree.TreeRollout); gold responses match it.
PROMPT = "question: {question}\n"
SEARCH_CALL = "<search> {query} </search>"
RESULT_OPEN = "\n<result>\n"
RESULT_CLOSE = "\n</result>\n"
ANSWER = "<answer> {answer} </answer>"

# Words of the search tool's own output: "Doc 1 (title): text", "No results.", and the start
# of its error texts ("Search error: timed out after 5 s"). Digits cover "Doc 1".."Doc 9".
TOOL_WORDS = ("Doc", "No", "results", "Search", "error", "timed", "out", "after", "s")
DIGITS = tuple("0123456789")
PUNCTUATION = tuple(".,?:()")

_WORD = re.compile(r"\w+|[^\w\s]")  # BERT-style pieces: runs of word characters, or one symbol


def template_words() -> tuple[str, ...]:
    """Every word and punctuation mark of the fixed text (templates, prompt, tool output),
    sorted; names (``{placeholders}``) excluded."""
    texts = [PROMPT] + [t for ts in DOC_TEMPLATES.values() for t in ts]
    texts += [p for q in QUESTION_TYPES for p in q.phrasings]
    words = {w for text in texts for w in _WORD.findall(re.sub(r"\{\w+\}", " ", text))}
    return tuple(sorted(words | set(TOOL_WORDS) | set(DIGITS) | set(PUNCTUATION)))
