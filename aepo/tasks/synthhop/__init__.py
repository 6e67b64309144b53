"""SynthHop: a seeded synthetic multi-hop QA task whose answers no model can have memorised, so
the policy has to search (``kb``: knowledge base, questions, gold trajectories; ``tokenizer``:
the syllable-level WordPiece tokenizer)."""

from aepo.tasks.synthhop.kb import KBConfig, SynthHop, gold_defect, validate_gold
from aepo.tasks.synthhop.templates import QUESTION_TYPES, QuestionType
from aepo.tasks.synthhop.tokenizer import build_tokenizer

__all__ = [
    "QUESTION_TYPES",
    "KBConfig",
    "QuestionType",
    "SynthHop",
    "build_tokenizer",
    "gold_defect",
    "validate_gold",
]
