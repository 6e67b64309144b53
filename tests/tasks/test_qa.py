"""The generic ``qa`` task: user files through HF datasets, named errors for bad data, prompts
through the chat template, the cached search index, rewards from config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aepo.rollout.rewards import RewardResult
from aepo.tasks.base import get_task
from aepo.tasks.qa import QATask
from aepo.tasks.qa_data import DataError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qa"


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "question": "where does ana live ?", "answers": ["rome"], "hops": 1},
            {"q": "x", "question": "where does bo live ?", "answers": "oslo", "hops": 2},
        ],
    )
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"id": "1", "title": "ana", "text": "ana lives in rome ."},
            {"id": "2", "contents": "bo\nbo lives in oslo ."},
        ],
    )
    return {"train": train, "tools": {"search": {"corpus": corpus, "top_k": 1}}}


def test_rows_tools_and_reward_from_config(files, tmp_path):
    task = get_task("qa", files | {"group_key": "hops"}, cache_dir=tmp_path / "cache")
    rows = task.samples("train")
    assert [r["answers"] for r in rows] == [["rome"], ["oslo"]]  # a string answer -> a list
    assert [r["id"] for r in rows] == ["a", "1"]  # a missing id -> the row index
    assert task.samples("eval") == rows  # no eval file: the train file
    assert task.metric_group == "hops" and rows[1]["hops"] == 2
    search = task.tools()["search"]
    assert "oslo" in search("bo").text  # the "contents" document is indexed
    index = list((tmp_path / "cache").glob("search-*.sqlite"))
    assert len(index) == 1
    task.tools()  # reopened, not rebuilt
    assert list((tmp_path / "cache").glob("search-*")) == index
    ok = "<search> ana </search>\n<result>\nx\n</result>\n<answer> Rome </answer>"
    assert task.reward(ok, rows[0]).reward == 1.0 + 0.1  # default f1 + tool bonus
    assert task.protocol() == {
        "tool_tags": ("search",),
        "result_tag": "result",
        "answer_tag": "answer",
    }


def test_edited_corpus_is_reindexed(files, tmp_path):
    cache = tmp_path / "cache"
    QATask(**files, cache_dir=str(cache)).tools()
    corpus = Path(files["tools"]["search"]["corpus"])
    corpus.write_text(corpus.read_text() + json.dumps({"text": "cy lives in lima ."}) + "\n")
    search = QATask(**files, cache_dir=str(cache)).tools()["search"]
    assert "lima" in search("cy").text
    assert len(list(cache.glob("search-*.sqlite"))) == 2


def test_prompt_through_chat_template_and_plain_text(files):
    from transformers import PreTrainedTokenizerFast

    from aepo.models import train_tokenizer

    task = QATask(**files, system_prompt="Use {tools}. Answer in <{answer_tag}>.")
    plain = train_tokenizer(["where does ana live ? use search"], vocab_size=300)
    sample = task.samples("train")[0]
    text = plain.decode(task.encode_prompt(sample, plain), skip_special_tokens=True)
    assert text == f"{task.system_prompt()}\nwhere does ana live ?\n"
    chat = PreTrainedTokenizerFast(
        tokenizer_object=plain.backend_tokenizer,
        chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
    )
    text = chat.decode(task.encode_prompt(sample, chat))
    assert text == f"[system]{task.system_prompt()}[user]where does ana live ?[assistant]"
    assert "<search> query </search> searches the documents" in task.system_prompt()


def bad_rows(tmp_path, rows) -> dict:
    return {"train": write_jsonl(tmp_path / "bad.jsonl", rows), "tools": {}}


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [{"question": "q", "answers": ["a"]}, {"answers": ["b"]}],
            r"bad.jsonl row 2: field 'question'",
        ),
        (
            [{"question": "q", "answers": ["a"]}, {"question": "r", "answers": []}],
            r"row 2: field 'answers' is empty",
        ),
        ([{"question": "q", "answers": [" "]}], r"row 1: field 'answers' is empty"),
        ([{"question": "q", "answers": 3}], r"row 1: field 'answers' must be a string or a list"),
        ([{"question": "q", "responses": ["a"]}], r"bad.jsonl: no field 'answers' in any row"),
        (["{not json"], r"bad.jsonl: cannot be read as json"),
    ],
    ids=[
        "no-question",
        "empty-answers",
        "blank-answer",
        "int-answers",
        "no-answers-field",
        "malformed",
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        QATask(**bad_rows(tmp_path, rows))


def test_bad_options_are_named(tmp_path, files):
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        QATask(train=str(tmp_path / "nope.jsonl"))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "t"}])
    task = QATask(train=files["train"], tools={"search": {"corpus": corpus}})
    with pytest.raises(DataError, match=r"c.jsonl row 1: no text \(field 'text' or 'contents'\)"):
        task.tools()
    with pytest.raises(DataError, match=r"system_prompt: unknown placeholder \{tool\}"):
        QATask(**files, system_prompt="call {tool}")
    with pytest.raises(DataError, match=r"user_template: unknown placeholder \{query\}"):
        QATask(**files, user_template="Q: {query}")
    with pytest.raises(DataError, match=r"reward.function 'no_such_mod:fn' cannot be imported"):
        QATask(**files, reward={"function": "no_such_mod:fn"})
    with pytest.raises(DataError, match=r"tags collide"):
        QATask(**files, protocol={"answer_tag": "search"})
    with pytest.raises(DataError, match=r"unknown task.options key 'trian'"):
        QATask(trian=files["train"])
    with pytest.raises(DataError, match=r"metric must be one of"):
        QATask(**files, reward={"metric": "bleu"})


def my_reward(text: str, sample) -> RewardResult:
    """A user reward: 1 when the gold answer appears anywhere in the response."""
    hit = float(sample["answers"][0] in text)
    return RewardResult(hit, hit, hit, True, "ok")


def test_user_reward_function(files):
    task = QATask(**files, reward={"function": "tests.tasks.test_qa:my_reward"})
    assert task.reward("it is rome", task.samples("train")[0]).reward == 1.0


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    rows = {"question": ["q1", "q2"], "answers": [["a"], ["b"]]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(str(tmp_path / "ds"))
    task = QATask(hf_dataset=str(tmp_path / "ds"), tools={})
    assert [s["question"] for s in task.samples("eval")] == ["q1", "q2"]
    with pytest.raises(DataError, match=r"has no split 'dev'"):
        QATask(hf_dataset=str(tmp_path / "ds"), split="dev", tools={})
    with pytest.raises(DataError, match=r"'no-such/dataset': not a directory .* not in the local"):
        QATask(hf_dataset="no-such/dataset", tools={})


def test_example_files_load():
    """The shipped example data are valid qa inputs (what the walkthrough trains on)."""
    task = QATask(
        train=str(EXAMPLE / "train.jsonl"),
        eval=str(EXAMPLE / "eval.jsonl"),
        tools={},
        group_key="hops",
    )
    train, held_out = task.samples("train"), task.samples("eval")
    assert len(train) == 80 and len(held_out) == 16
    people = lambda rows: {r["question"].split(" does ")[1].split()[0] for r in rows}
    assert not people(train) & people(held_out)  # eval asks about people train never does


def test_cli_reports_bad_data_and_exits_2(tmp_path):
    """What a user sees: ``aepo train`` stops with the file and field named, exit code 2."""
    import os
    import subprocess
    import sys

    bad = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answers": [], "hops": 1}])
    cmd = [
        sys.executable,
        "-m",
        "aepo.cli",
        "train",
        str(ROOT / "examples" / "qa.yaml"),
        f"task.options.train={bad}",
        f"run.dir={tmp_path / 'run'}",
        "model.path=null",  # a fresh clone has no examples/qa/model: the data is checked first
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"aepo train: data error: {bad} row 1: field 'answers' is empty" in proc.stderr


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TwoTurnEngine:
    """Scripted policy for the tool-role test: a search call, then (after a result) the answer."""

    vocab_size = 400

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, requests, sampling, stop):
        from aepo.rollout.engines.base import GenResult

        out = []
        for r in requests:
            seen = self.tok.decode(r.token_ids)
            text, end = (
                ("<answer> rome </answer>", "</answer>")
                if "<|im_start|>tool" in seen
                else ("<search> ana </search>", "</search>")
            )
            ids = self.tok.encode(text, add_special_tokens=False)
            out.append(GenResult(ids, [-1.0] * len(ids), [1.0] * len(ids), "stop", end))
        return out


def test_tool_role_results_go_into_the_tool_turn(files, tmp_path):
    """protocol.tool_role: the model sees its turn closed, the result in a tool turn and its
    turn reopened; the inserted tokens have mask 0; the reward reads the canonical text."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from aepo.models import train_tokenizer
    from aepo.rollout.branching import BranchConfig
    from aepo.rollout.tree import RolloutConfig, TreeRollout

    base = train_tokenizer(["ana lives in rome . where does ana live ? tool user"], 400)
    base.backend_tokenizer.add_special_tokens(
        [AddedToken("<|im_start|>"), AddedToken("<|im_end|>")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, chat_template=CHATML)
    task = QATask(**files, protocol={"tool_role": True}, cache_dir=str(tmp_path / "c"))
    protocol = task.protocol(tok)
    assert protocol["result_open"] == "<|im_end|>\n<|im_start|>tool\n<result>\n"
    assert protocol["result_close"] == "\n</result><|im_end|>\n<|im_start|>assistant\n"
    cfg = RolloutConfig(branch=BranchConfig(mode="flat", k=1), **protocol)
    rollout = TreeRollout(TwoTurnEngine(tok), tok, task.tools(), cfg)
    sample = task.samples("train")[0]
    (t,) = rollout.run([task.encode_prompt(sample, tok)]).trajectories
    seen = tok.decode(t.response_ids)
    assert seen.startswith("<search> ana </search><|im_end|>\n<|im_start|>tool\n<result>\n")
    assert "</result><|im_end|>\n<|im_start|>assistant\n<answer> rome </answer>" in seen
    call = t.tool_calls[0]
    assert set(t.loss_mask[call.start : call.end]) == {0}  # the whole tool turn: not sampled
    assert sum(t.loss_mask) == len(t.response_ids) - (call.end - call.start)
    text = rollout.response_text(t)
    assert (
        text == f"<search> ana </search>\n<result>\n{call.text}\n</result>\n<answer> rome </answer>"
    )
    assert task.reward(text, sample).reward == 1.1  # f1 1 + tool bonus: the format gate passes
    with pytest.raises(DataError, match="tool_role needs a tokenizer with a chat template"):
        task.protocol(base)


def test_renamed_call_tag(files, tmp_path):
    """tools.search.tag renames the call tag: <retrieve> q </retrieve> calls the search tool."""
    files["tools"]["search"]["tag"] = "retrieve"
    task = QATask(**files, protocol={"result_tag": "information"}, cache_dir=str(tmp_path))
    assert set(task.tools()) == {"retrieve"} and task.protocol()["tool_tags"] == ("retrieve",)
    assert "<retrieve> query </retrieve> searches" in task.system_prompt()
    text = "<retrieve> ana </retrieve>\n<information>\nx\n</information>\n<answer>rome</answer>"
    assert task.reward(text, task.samples("train")[0]).reward == 1.1
