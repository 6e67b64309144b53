"""Agentic-QA rewards (AEPO_SPEC.md section 5): a format gate over the response's tags, then
exact match / token F1 after SQuAD normalisation, plus a bonus for a right answer that used every
tool kind. Pure functions of the response text (the prompt is not part of it)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# End-of-sequence markers a decoder may leave after the answer; they count as trailing space.
_TRAILING_EOS = re.compile(r"(?:\s|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|</s>)*\Z")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _as_list(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


def exact_match(prediction: str | None, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str | None, references: str | Sequence[str]) -> float:
    """SQuAD token F1 over normalised whitespace tokens, max over references (0.0 for none).
    Two empty answers score 1.0; one empty answer scores 0.0."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    return max(
        (_f1(pred, normalize_answer(ref).split()) for ref in _as_list(references)), default=0.0
    )


def contains_match(prediction: str | None, references: str | Sequence[str]) -> float:
    """1.0 when a normalised reference occurs in the normalised prediction as whole words."""
    if prediction is None:
        return 0.0
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(r)} " in pred for r in _as_list(references)))


def _block(tag: str) -> re.Pattern:
    return re.compile(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)


def extract_answer(text: str, answer_tag: str = "answer") -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` block, or ``None``.
    (Whether there is exactly one, and whether it ends the text, is :func:`check_format`'s job.)"""
    answers = _block(answer_tag).findall(text)
    return answers[-1].strip() if answers else None


def count_tool_calls(
    text: str, tool_tags: Sequence[str] = ("search", "python"), result_tag: str = "result"
) -> dict[str, int]:
    """Closed ``<tag>...</tag>`` calls per tool, outside ``<result>`` blocks (a tool's output may
    quote tags; it is not the policy's call)."""
    policy_text = _block(result_tag).sub(" ", text)
    return {
        tag: len(re.findall(f"<{re.escape(tag)}>.*?</{re.escape(tag)}>", policy_text, re.DOTALL))
        for tag in tool_tags
    }


def check_tags(
    tool_tags: Sequence[str], result_tag: str = "result", answer_tag: str = "answer"
) -> None:
    """Raise ValueError unless the tags are distinct words (the tool-call protocol)."""
    tags = [*tool_tags, result_tag, answer_tag]
    if bad := [t for t in tags if not re.fullmatch(r"\w+", t)]:
        raise ValueError(f"invalid tags {bad}: tags are words (letters, digits, _)")
    if len(set(tags)) != len(tags):
        raise ValueError(
            f"tags collide: tool tags {list(tool_tags)}, result tag {result_tag!r} and answer "
            f"tag {answer_tag!r} must all differ"
        )


def check_format(
    text: str,
    tool_tags: Sequence[str] = ("search", "python"),
    result_tag: str = "result",
    answer_tag: str = "answer",
) -> tuple[bool, str]:
    """Is the response well-formed? Returns ``(ok, reason)``; ``reason`` is ``"ok"`` or names
    the first defect. ``result_tag`` / ``answer_tag`` rename ``<result>`` / ``<answer>``.

    Grammar: free text (containing none of the tags) interleaved with tool calls
    ``<tag>query</tag>``, each immediately followed (whitespace allowed) by one
    ``<result>...</result>``; then exactly one ``<answer>...</answer>``, followed by nothing but
    whitespace or end-of-sequence markers. Result content is opaque (tool output may quote tags);
    a call or answer may not contain tags; a closing tag without its opening one is stray.
    """
    check_tags(tool_tags, result_tag, answer_tag)
    tags = [*tool_tags, result_tag, answer_tag]
    result_open = re.compile(rf"\s*<{re.escape(result_tag)}>")
    tag_re = re.compile(r"<(/?)(" + "|".join(map(re.escape, tags)) + r")>")
    pos, answer_end = 0, None
    while m := tag_re.search(text, pos):
        closing, name = m.group(1) == "/", m.group(2)
        if answer_end is not None:
            if name == answer_tag and not closing:
                return False, f"more than one <{answer_tag}>"
            return False, f"text after </{answer_tag}>"
        if closing:
            return False, f"stray </{name}>"
        if name == result_tag:
            return False, f"<{result_tag}> without a tool call before it"
        end = text.find(f"</{name}>", m.end())
        if end < 0:
            return False, f"unclosed <{name}>"
        if inner := tag_re.search(text, m.end(), end):
            return False, f"{inner.group(0)} inside <{name}>"
        pos = end + len(name) + 3
        if name == answer_tag:
            answer_end = pos
            continue
        result = result_open.match(text, pos)
        if result is None:
            return False, f"<{name}> call without a <{result_tag}> after it"
        result_end = text.find(f"</{result_tag}>", result.end())
        if result_end < 0:
            return False, f"unclosed <{result_tag}>"
        pos = result_end + len(result_tag) + 3
    if answer_end is None:
        return False, f"missing <{answer_tag}>"
    if _TRAILING_EOS.match(text, answer_end) is None:
        return False, f"text after </{answer_tag}>"
    return True, "ok"


METRICS = ("f1", "em", "contains")


@dataclass(frozen=True)
class RewardConfig:
    """How a QA response is scored (defaults: the released AEPO/ARPO reward)."""

    metric: Literal["f1", "em", "contains"] = "f1"  # token F1 (released), exact match, or
    # whether a reference occurs in the answer (whole words)
    format_penalty: float = -1.0  # reward of a response that fails the format gate
    tool_bonus: float = 0.1  # added when EM = 1 and every tool in bonus_tools was called
    bonus_tools: tuple[str, ...] = ("search", "python")  # tools the bonus requires, all of them
    tool_tags: tuple[str, ...] = ("search", "python")  # tags the format gate reads as tool calls
    result_tag: str = "result"  # the tag the rollout wraps tool results in
    answer_tag: str = "answer"  # the tag of the final answer

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        check_tags(self.tool_tags, self.result_tag, self.answer_tag)


@dataclass(frozen=True)
class RewardResult:
    """A scored response. ``em``/``f1`` score the extracted answer even when the format gate
    fails (for logging); ``reward`` is then ``format_penalty``."""

    reward: float  # the scalar the advantage sees
    em: float  # exact match of the extracted answer (0.0 when there is none)
    f1: float  # token F1 of the extracted answer (0.0 when there is none)
    format_ok: bool  # passed the format gate
    reason: str  # "ok" or the first format defect
    tool_calls: dict[str, int] = field(default_factory=dict)  # closed calls per tool tag
    answer: str | None = None  # the extracted answer text


def qa_reward(
    response_text: str, references: str | Sequence[str], config: RewardConfig = RewardConfig()
) -> RewardResult:
    """Score one response: ``format_penalty`` if malformed, else the answer score
    (``config.metric``) plus ``tool_bonus`` when EM = 1 and every ``bonus_tools`` tool was used."""
    c = config
    format_ok, reason = check_format(response_text, c.tool_tags, c.result_tag, c.answer_tag)
    tool_calls = count_tool_calls(response_text, c.tool_tags, c.result_tag)
    answer = extract_answer(response_text, c.answer_tag)
    em, f1 = exact_match(answer, references), token_f1(answer, references)
    if not format_ok:
        reward = config.format_penalty
    else:
        scores = {"f1": f1, "em": em}
        reward = scores[c.metric] if c.metric in scores else contains_match(answer, references)
        if em == 1.0 and all(tool_calls.get(t, 0) > 0 for t in config.bonus_tools):
            reward += config.tool_bonus
    return RewardResult(reward, em, f1, format_ok, reason, tool_calls, answer)


@runtime_checkable
class RewardFn(Protocol):
    """A task's reward hook: score a response against its dataset sample."""

    def __call__(self, response_text: str, sample: Mapping[str, Any]) -> RewardResult: ...


@dataclass(frozen=True)
class QAReward:
    """The default :class:`RewardFn`: :func:`qa_reward` against ``sample[answers_key]``."""

    config: RewardConfig = RewardConfig()  # how responses are scored
    answers_key: str = "answers"  # sample field holding the reference answer(s)

    def __call__(self, response_text: str, sample: Mapping[str, Any]) -> RewardResult:
        return qa_reward(response_text, sample[self.answers_key], self.config)
