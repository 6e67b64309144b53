"""``task.name: qa``: train and evaluate on your own question/answer data, from YAML alone.

Options (``task.options``; every key optional except ``train``):

```yaml
task:
  name: qa
  options:
    train: data/train.jsonl          # JSONL or Parquet: question + answers (str or list)
    eval: data/eval.jsonl            # default: the train file
    # hf_dataset: path/saved_with_save_to_disk, split: train   (instead of train/eval files)
    question_key: question
    answers_key: answers
    id_key: id
    group_key: null                  # a column to log exact match by (e.g. hops)
    system_prompt: "..."             # placeholders: {tools} {tool_tags} {result_tag} {answer_tag}
    user_template: "{question}"      # placeholders: any field of the row
    protocol: {result_tag: result, answer_tag: answer}
    tools:
      search: {corpus: data/corpus.jsonl, top_k: 3}   # or {url: http://host:8000/retrieve}
      python: {timeout_s: 5, memory_mb: 256}          # the sandboxed python tool
    reward: {metric: em, format_penalty: -0.1, tool_bonus: 0.0}
    # reward: {function: "my_module:my_reward"}       # a RewardFn: (text, sample) -> RewardResult
```

Prompts go through the tokenizer's chat template when it has one (system turn, the question
as the user turn, generation from the assistant turn); otherwise the system prompt and the
question are joined as plain text, as the built-in tasks do. Tool calls, results and the
answer are tagged text inside the assistant turn (Search-R1 style), so the rollout masks stay
exactly the sampled tokens.
"""

from __future__ import annotations

import copy
import importlib
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aepo.rollout.rewards import QAReward, RewardConfig, RewardFn, check_tags
from aepo.tasks.base import Task, register
from aepo.tasks.qa_data import DataError, Fields, cached_search_tool, open_rows, qa_rows

DEFAULT_SYSTEM = (
    "Answer the question. You may call tools: {tools}. Call one by writing "
    "<tool>query</tool>; its output then appears inside <{result_tag}> </{result_tag}>. "
    "Give the final answer as <{answer_tag}> answer </{answer_tag}>."
)
TOOL_HELP = {  # tool -> how the default system prompt describes it ({tag}: its call tag)
    "search": "<{tag}> query </{tag}> searches the documents",
    "python": "<{tag}> code </{tag}> runs Python and shows what it prints",
}
SYSTEM_FIELDS = ("tools", "tool_tags", "result_tag", "answer_tag")
_SYSTEM_PLACES = " ".join("{" + f + "}" for f in SYSTEM_FIELDS)
OPTION_HELP = {  # task.options key -> (default, meaning): the config reference's qa table
    "train": (None, "JSONL / Parquet file of train questions (required unless hf_dataset)"),
    "eval": (None, "file of eval questions (default: the train file)"),
    "hf_dataset": (None, "a save_to_disk folder or a hub name in the local cache (no download)"),
    "split": ("train", "hf_dataset split to train on"),
    "eval_split": ("test", "hf_dataset split to evaluate on"),
    "question_key": ("question", "field holding the question"),
    "answers_key": ("answers", "field holding the gold answer(s): a string or a list"),
    "id_key": ("id", "field holding the question id (default: the row number)"),
    "group_key": (None, "field whose values exact match is also logged by"),
    "system_prompt": (DEFAULT_SYSTEM, "the system turn; placeholders: " + _SYSTEM_PLACES),
    "user_template": ("{question}", "the user turn; placeholders: any field of a row"),
    "protocol": (
        {"result_tag": "result", "answer_tag": "answer", "tool_role": False},
        "tags of results / answer; tool_role: results in the chat template's tool turn",
    ),
    "tools": ({"search": {}}, "search: {corpus or url, top_k, tag}; python: {timeout_s, tag}"),
    "reward": (
        {"metric": RewardConfig.metric},
        "metric (em, f1, contains), format_penalty, tool_bonus; or a function",
    ),
    "cache_dir": (None, "where the search index is cached (None: run.dir/cache in a run)"),
}
KNOWN_OPTIONS = tuple(OPTION_HELP)


def option(options: Mapping[str, Any], key: str) -> Any:
    """``options[key]``, or (unset or None) its default: :data:`OPTION_HELP` states each
    default once, for the task and the config reference alike."""
    value = options.get(key)
    return copy.deepcopy(OPTION_HELP[key][0]) if value is None else value


def _placeholders(template: str, allowed, key: str) -> None:
    """Raise DataError naming an unknown ``{placeholder}`` of ``template``."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(f"task.options.{key}: malformed template: {exc}") from exc
    for name in names:
        if name not in allowed:
            raise DataError(
                f"task.options.{key}: unknown placeholder {{{name}}}; "
                f"available: {', '.join('{' + a + '}' for a in allowed)}"
            )


def tool_turn_wrappers(tokenizer, result_tag: str = "result") -> tuple[str, str]:
    """(text before, text after) a tool result so that it sits in the chat template's tool
    turn: the assistant turn closed, the tool turn holding ``<result>...</result>``, and the
    assistant turn reopened (read off the template by rendering marker messages)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("task.options.protocol.tool_role needs a tokenizer with a chat template")
    call, result = "\x01CALL", "\x02RESULT"
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": result},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates raise their own errors for unknown roles
        raise DataError(
            f"task.options.protocol.tool_role: the chat template failed: {exc}"
        ) from exc
    if call not in text or result not in text or text.index(call) > text.index(result):
        raise DataError(
            "task.options.protocol.tool_role: the chat template has no tool role (a tool "
            "message is not rendered after the assistant's); set tool_role: false"
        )
    before = text[text.index(call) + len(call) : text.index(result)]
    after = text[text.index(result) + len(result) :]
    return f"{before}<{result_tag}>\n", f"\n</{result_tag}>{after}"


def load_reward_function(spec: str) -> RewardFn:
    """``"package.module:function"`` -> the function (a :class:`RewardFn`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"task.options.reward.function {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"task.options.reward.function {spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise DataError(f"task.options.reward.function {spec!r} is not callable")
    return fn


@register("qa")
class QATask(Task):
    """A question-answering task over the user's files; see the module docstring."""

    name = "qa"
    uses_cache_dir = True  # the search index is cached in the run's directory

    def __init__(self, **options: Any):
        self.options = options
        self.tool_options, protocol = self.check_options(options)
        self.tool_tags = protocol["tool_tags"]
        self.result_tag, self.answer_tag = protocol["result_tag"], protocol["answer_tag"]
        self.tool_role = protocol["tool_role"]
        self.fields = Fields(
            option(options, "question_key"),
            option(options, "answers_key"),
            option(options, "id_key"),
            option(options, "group_key"),
        )
        self.metric_group = self.fields.group
        self.system = option(options, "system_prompt")
        self.user = option(options, "user_template")
        _placeholders(self.system, SYSTEM_FIELDS, "system_prompt")
        self._splits = {split: self._load(split) for split in ("train", "eval")}
        _placeholders(self.user, sorted(self._splits["train"][0]), "user_template")
        self.reward = self._reward(dict(option(options, "reward")))

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> tuple[dict, dict[str, Any]]:
        """Check the options that need no data (keys, tools, tags, templates), as config
        loading does before any work; returns (tool options, protocol)."""
        if unknown := sorted(set(options) - set(KNOWN_OPTIONS)):
            raise DataError(
                f"unknown task.options key {unknown[0]!r}; valid: {', '.join(KNOWN_OPTIONS)}"
            )
        tools = dict(option(options, "tools"))
        if unknown := sorted(set(tools) - set(TOOL_HELP)):
            raise DataError(f"task.options.tools: unknown tool {unknown[0]!r}; have search, python")
        given, defaults = options.get("protocol") or {}, OPTION_HELP["protocol"][0]
        if unknown := sorted(set(given) - set(defaults)):
            raise DataError(f"task.options.protocol: unknown key {unknown[0]!r}")
        protocol = defaults | dict(given)  # each tag's default, once
        out = {
            "tool_tags": tuple((opts or {}).get("tag", name) for name, opts in tools.items()),
            "result_tag": protocol["result_tag"],
            "answer_tag": protocol["answer_tag"],
            "tool_role": bool(protocol["tool_role"]),
        }
        try:
            check_tags(out["tool_tags"], out["result_tag"], out["answer_tag"])
        except ValueError as exc:
            raise DataError(f"task.options.protocol / tools: {exc}") from exc
        _placeholders(option(options, "system_prompt"), SYSTEM_FIELDS, "system_prompt")
        return tools, out

    @property
    def tags(self) -> dict[str, Any]:
        """The tool-call protocol's tags, as RolloutConfig and RewardConfig take them."""
        return {
            "tool_tags": self.tool_tags,
            "result_tag": self.result_tag,
            "answer_tag": self.answer_tag,
        }

    def protocol(self, tokenizer=None) -> dict[str, Any]:
        """Rollout tags (tool calls, the inserted result, the answer); with ``tool_role`` the
        result also goes into the chat template's tool turn (:func:`tool_turn_wrappers`)."""
        out = self.tags
        if self.tool_role:
            wrappers = tool_turn_wrappers(tokenizer, self.result_tag)
            out |= dict(zip(("result_open", "result_close"), wrappers, strict=True))
        return out

    def _load(self, split: str) -> list[dict[str, Any]]:
        o = self.options
        if o.get("hf_dataset") is not None:
            name = option(o, "split" if split == "train" else "eval_split")
            data = open_rows(hf_dataset=o["hf_dataset"], split=name)
            return qa_rows(data, f"{o['hf_dataset']}[{name}]", self.fields)
        path = o.get(split) or (o.get("train") if split == "eval" else None)
        if path is None:
            raise DataError("task.options.train: the qa task needs a train file (or hf_dataset)")
        return qa_rows(open_rows(path), str(path), self.fields)

    def _reward(self, cfg: dict[str, Any]) -> RewardFn:
        if "function" in cfg:
            return load_reward_function(cfg.pop("function"))
        tags = self.tags
        cfg.setdefault("bonus_tools", list(self.tool_tags))
        cfg["bonus_tools"] = tuple(cfg["bonus_tools"])
        try:
            return QAReward(RewardConfig(**(tags | cfg)))
        except (TypeError, ValueError) as exc:
            raise DataError(f"task.options.reward: {exc}") from exc

    def samples(self, split: str) -> list[dict[str, Any]]:
        return self._splits["train" if split == "train" else "eval"]

    def system_prompt(self) -> str:
        tools = "; ".join(
            TOOL_HELP[name].format(tag=tag)
            for name, tag in zip(self.tool_options, self.tool_tags, strict=True)
        )
        return self.system.format(
            tools=tools,
            tool_tags=", ".join(self.tool_tags),
            result_tag=self.result_tag,
            answer_tag=self.answer_tag,
        )

    def encode_prompt(self, sample: Mapping[str, Any], tokenizer) -> list[int]:
        """Token ids of the prompt: the chat template (system, user turn, generation prompt)
        when the tokenizer has one, else "system\\nquestion\\n" as plain text."""
        user = self.user.format(**sample)
        if getattr(tokenizer, "chat_template", None):
            messages = [
                {"role": "system", "content": self.system_prompt()},
                {"role": "user", "content": user},
            ]
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(f"{self.system_prompt()}\n{user}\n")

    def tools(self) -> dict:
        """Fresh tool instances (tag -> tool) from ``task.options.tools``."""
        out = {}
        for (name, opts), tag in zip(self.tool_options.items(), self.tool_tags, strict=True):
            opts = {k: v for k, v in (opts or {}).items() if k != "tag"}
            out[tag] = self._search(opts) if name == "search" else self._python(opts)
        return out

    def _search(self, opts: dict[str, Any]):
        from aepo.rollout.tools.search import HTTPSearchTool

        url, corpus = opts.pop("url", None), opts.pop("corpus", None)
        if (url is None) == (corpus is None):
            raise DataError("task.options.tools.search: give exactly one of corpus or url")
        if url is not None:
            return HTTPSearchTool(url, **opts)
        if not Path(corpus).is_file():
            raise DataError(f"task.options.tools.search.corpus: {corpus}: no such file")
        cache = self.options.get("cache_dir") or Path(corpus).parent / ".aepo_cache"
        return cached_search_tool(corpus, cache, opts)

    @staticmethod
    def _python(opts: dict[str, Any]):
        from aepo.rollout.tools.python_tool import PythonTool

        return PythonTool(**opts)

    def build_model(self, path: Path, seed: int) -> Path:
        raise DataError("task qa trains your model: set model.path to a Hugging Face model folder")
