"""QA rewards: SQuAD normalisation, EM / token F1 by hand, the format gate, the tool bonus."""

from __future__ import annotations

import pytest

from aepo.rollout.rewards import (
    QAReward,
    RewardConfig,
    RewardFn,
    check_format,
    count_tool_calls,
    exact_match,
    extract_answer,
    normalize_answer,
    qa_reward,
    token_f1,
)

SEARCH = (
    "<search>capital of France</search>\n<result>Doc 1 (Paris): Paris is the capital.</result>\n"
)
PYTHON = "<python>print(2 + 2)</python> <result>4</result>\n"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A   cat,  an  apple! ", "cat apple"),
        ("Théâtre", "théâtre"),  # only ASCII punctuation goes; letters keep their accents
        ("theory of another", "theory of another"),  # articles are whole words only
        ("U.S.A.", "usa"),
        ("rock-'n'-roll", "rocknroll"),
        ("", ""),
        ("the a an", ""),
        ("Tab\tand\nnewline", "tab and newline"),
    ],
    ids=[
        "article",
        "spaces-punct",
        "accents",
        "article-in-word",
        "dots",
        "hyphens",
        "empty",
        "only-articles",
        "tabs",
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1"),
    [
        ("the big cat", "a big dog", 0.0, 0.5),  # "big cat" vs "big dog": P = R = 1/2
        ("Paris", "paris.", 1.0, 1.0),
        ("Paris France", "Paris", 0.0, 2 / 3),  # P = 1/2, R = 1 -> 2/3
        ("big big cat", "big cat cat", 0.0, 2 / 3),  # clipped counts: common = 2, P = R = 2/3
        ("London", ["Paris", "City of Paris"], 0.0, 0.0),
        ("Paris", ["City of Paris", "Paris"], 1.0, 1.0),  # max over references
        ("city of Paris", ["Paris", "City of Paris, France"], 0.0, 6 / 7),  # max(1/2, 6/7)
        ("the", "a", 1.0, 1.0),  # both normalise to empty
        ("the", "Paris", 0.0, 0.0),  # empty prediction
        ("Paris", [], 0.0, 0.0),  # no references
        (None, "Paris", 0.0, 0.0),  # no answer
    ],
    ids=[
        "cat-dog",
        "case-punct",
        "partial",
        "repeated-tokens",
        "multi-ref-miss",
        "multi-ref-hit",
        "multi-ref-max",
        "both-empty",
        "empty-pred",
        "no-refs",
        "none",
    ],
)
def test_em_and_f1(prediction, references, em, f1):
    assert exact_match(prediction, references) == em
    assert token_f1(prediction, references) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer> Paris </answer>", "Paris"),
        ("x <answer>a</answer> y <answer>b\nc</answer>", "b\nc"),
        ("no answer here", None),
        ("<answer>unclosed", None),
    ],
    ids=["one", "last-of-two", "none", "unclosed"],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


WELL_FORMED = {
    "answer-only": "<answer>Paris</answer>",
    "think-then-answer": "<think>easy</think> The answer is known.\n<answer>Paris</answer>",
    "search-python": f"Let me look.\n{SEARCH}Now compute.\n{PYTHON}<answer>Paris</answer>",
    "multi-turn": f"{SEARCH}{SEARCH}{PYTHON}{SEARCH}<answer>Paris</answer>",
    "trailing-eos": f"{SEARCH}<answer>Paris</answer>\n<|im_end|>",
    "trailing-space": "<answer>Paris</answer>  \n\n",
    "tags-in-result": "<search>q</search><result>see <answer>x</answer> <python></result>"
    "<answer>Paris</answer>",
    "empty-answer": "<answer></answer>",
}


@pytest.mark.parametrize("text", WELL_FORMED.values(), ids=WELL_FORMED.keys())
def test_well_formed(text):
    assert check_format(text) == (True, "ok")


MALFORMED = {
    "unclosed-tool": ("<search>capital of France <answer>Paris</answer>", "unclosed <search>"),
    "unclosed-at-end": ("Thinking <python>print(1)", "unclosed <python>"),
    "call-without-result": ("<search>q</search> so <answer>Paris</answer>", "without a <result>"),
    "call-at-end": ("<search>q</search>", "without a <result>"),
    "unclosed-result": ("<search>q</search><result>Doc 1", "unclosed <result>"),
    "two-answers": ("<answer>Paris</answer><answer>Lyon</answer>", "more than one <answer>"),
    "text-after-answer": ("<answer>Paris</answer> Actually, Lyon.", "text after </answer>"),
    "tool-after-answer": (f"<answer>Paris</answer>{SEARCH}", "text after </answer>"),
    "missing-answer": (f"{SEARCH}Paris", "missing <answer>"),
    "empty-response": ("", "missing <answer>"),
    "stray-close": ("</search><answer>Paris</answer>", "stray </search>"),
    "stray-close-answer": ("Paris</answer>", "stray </answer>"),
    "stray-result": ("<result>made up</result><answer>Paris</answer>", "<result> without"),
    "nested-call": (
        "<search>a <python>1</python></search><result>r</result><answer>x</answer>",
        "<python> inside <search>",
    ),
    "unclosed-answer": (f"{SEARCH}<answer>Paris", "unclosed <answer>"),
}


@pytest.mark.parametrize(("text", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_gets_penalty(text, reason):
    ok, why = check_format(text)
    assert not ok and reason in why, why
    result = qa_reward(text, "Paris")
    assert result.reward == -1.0 and not result.format_ok and reason in result.reason


def test_custom_tool_tags_and_reserved_names():
    text = "<browse>url</browse><result>page</result><answer>x</answer>"
    assert check_format(text, tool_tags=("browse",)) == (True, "ok")
    assert not check_format(text, tool_tags=("search",))[0]  # <result> without a known call
    with pytest.raises(ValueError, match="tags collide"):
        check_format(text, tool_tags=("answer",))
    with pytest.raises(ValueError, match="invalid tags"):
        check_format(text, tool_tags=("a b",))


def test_renamed_result_and_answer_tags():
    """Search-R1's protocol: <information> for results, <answer> kept; and a renamed answer."""
    text = "<search>q</search>\n<information>doc</information>\n<final>Paris</final>"
    kw = {"tool_tags": ("search",), "result_tag": "information", "answer_tag": "final"}
    assert check_format(text, **kw) == (True, "ok")
    assert check_format(text)[0] is False  # with the default tags the call has no <result>
    cfg = RewardConfig(
        metric="em",
        tool_tags=("search",),
        result_tag="information",
        answer_tag="final",
        tool_bonus=0.0,
    )
    res = qa_reward(text, "paris", cfg)
    assert (res.reward, res.answer, res.tool_calls) == (1.0, "Paris", {"search": 1})
    with pytest.raises(ValueError, match="tags collide"):
        RewardConfig(result_tag="answer")


def test_contains_metric():
    cfg = RewardConfig(metric="contains", bonus_tools=())
    assert qa_reward("<answer>it is Paris, France</answer>", "paris", cfg).reward == 1.0
    assert qa_reward("<answer>Parisian</answer>", "paris", cfg).reward == 0.0  # whole words
    with pytest.raises(ValueError, match="metric must be one of f1, em, contains"):
        RewardConfig(metric="bleu")


def test_count_tool_calls_ignores_result_content():
    text = (
        f"{SEARCH}<search>q2</search><result><python>x</python></result>{PYTHON}<answer>a</answer>"
    )
    assert count_tool_calls(text) == {"search": 2, "python": 1}


BOTH = f"{SEARCH}{PYTHON}"


@pytest.mark.parametrize(
    ("text", "config", "reward"),
    [
        (f"{BOTH}<answer>Paris</answer>", RewardConfig(), 1.1),
        (f"{SEARCH}<answer>Paris</answer>", RewardConfig(), 1.0),  # python not used
        (f"{PYTHON}<answer>Paris</answer>", RewardConfig(), 1.0),  # search not used
        ("<answer>Paris</answer>", RewardConfig(), 1.0),
        (f"{BOTH}<answer>Paris France</answer>", RewardConfig(), 2 / 3),  # EM 0: no bonus
        (f"{BOTH}<answer>Paris France</answer>", RewardConfig(metric="em"), 0.0),
        (f"{BOTH}<answer>Paris</answer>", RewardConfig(metric="em"), 1.1),
        (f"{SEARCH}<answer>Paris</answer>", RewardConfig(bonus_tools=("search",)), 1.1),
        (f"{BOTH}<answer>Paris</answer>", RewardConfig(tool_bonus=0.0), 1.0),
        (f"{BOTH}<answer>Paris</answer> junk", RewardConfig(format_penalty=-0.5), -0.5),
    ],
    ids=[
        "both-tools-right",
        "search-only",
        "python-only",
        "no-tools",
        "partial-no-bonus",
        "em-partial",
        "em-both",
        "bonus-search-only",
        "bonus-off",
        "custom-penalty",
    ],
)
def test_reward_and_tool_bonus(text, config, reward):
    assert qa_reward(text, ["Paris", "City of Light"], config).reward == pytest.approx(reward)


def test_reward_result_fields():
    result = qa_reward(f"{BOTH}{SEARCH}<answer>the Paris</answer>", "Paris")
    assert result.format_ok and result.reason == "ok"
    assert (result.em, result.f1, result.answer) == (1.0, 1.0, "the Paris")
    assert result.tool_calls == {"search": 2, "python": 1}
    malformed = qa_reward("<answer>Paris</answer> more", "Paris")
    assert (malformed.reward, malformed.em, malformed.format_ok) == (-1.0, 1.0, False)


def test_reward_config_validates_metric():
    with pytest.raises(ValueError, match="metric"):
        RewardConfig(metric="bleu")  # type: ignore[arg-type]


def test_qa_reward_fn_hook():
    fn = QAReward(RewardConfig(metric="em"), answers_key="golden_answers")
    assert isinstance(fn, RewardFn)
    sample = {"question": "Capital of France?", "golden_answers": ["Paris"]}
    assert fn("<answer>paris</answer>", sample).reward == 1.0
    assert QAReward()("<answer>Lyon</answer>", {"answers": "Paris"}).reward == 0.0
