"""Builds the `examples/qa` walkthrough: a small QA dataset with a retrieval corpus (the JSONL
files next to this script), and a tiny instruct-style model folder for it: a byte-level BPE
tokenizer with a ChatML chat template, and a Llama briefly fine-tuned on gold search-then-answer
conversations rendered through that template. Everything `aepo train examples/qa.yaml` needs.

    python examples/qa/make_example.py                    # the model, at examples/qa/model
    python examples/qa/make_example.py --data             # also rewrite the JSONL files

The model stands in for "your instruct model": replace `model.path` in qa.yaml with any Hugging
Face causal LM folder that has a chat template, and the three JSONL files with your own.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYLLABLES = ["ka", "lo", "mi", "ra", "te", "vu", "sen", "dor", "pal", "quin", "bel", "tor"]
COUNTRIES = ["norvia", "castel", "umbra", "velland"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>"]


def make_world(seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """(person -> city, city -> country), with made-up names."""
    rng = random.Random(seed)
    names = sorted({rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(400)})
    rng.shuffle(names)
    cities = names[:8]
    people = names[8:56]
    city_country = {c: COUNTRIES[i % len(COUNTRIES)] for i, c in enumerate(cities)}
    return {p: rng.choice(cities) for p in people}, city_country


def write_data(seed: int = 0) -> None:
    """train.jsonl / eval.jsonl (question, answers, hops, id) and corpus.jsonl (id, title,
    text): one document per person and per city; eval asks about people train never does."""
    lives, country = make_world(seed)
    corpus = [{"id": f"p-{p}", "title": p, "text": f"{p} lives in {c} ."} for p, c in lives.items()]
    corpus += [
        {"id": f"c-{c}", "title": c, "text": f"{c} is a city in {k} ."} for c, k in country.items()
    ]
    splits = {"train": [], "eval": []}
    for i, (p, c) in enumerate(lives.items()):
        rows = splits["eval" if i >= len(lives) - 8 else "train"]
        for q in (
            {"question": f"where does {p} live ?", "answers": [c], "hops": 1},
            {"question": f"in which country does {p} live ?", "answers": [country[c]], "hops": 2},
        ):
            rows.append({"id": f"q{len(rows)}-{p}", **q})
    for name, rows in [("corpus", corpus), *splits.items()]:
        with open(HERE / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def build_tokenizer(texts: list[str]):
    """Byte-level BPE trained on ``texts``, the tags as single tokens, ChatML template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHATML,
    )


def gold_response(task, tools, sample) -> str:
    """Search the person; for 2 hops also their city; answer. Results exactly as the tool
    returns them, wrapped as the rollout inserts them."""
    person = re.search(r"does (\w+) live", sample["question"]).group(1)
    queries = [person]
    if sample["hops"] == 2:
        queries.append(tools["search"](person).text.split(" lives in ")[-1].split()[0])
    parts = [
        f"<search> {q} </search>\n<result>\n{tools['search'](q).text}\n</result>\n" for q in queries
    ]
    return "".join(parts) + f"<answer> {sample['answers'][0]} </answer>"


def build_model(out: Path, steps: int = 400, seed: int = 0) -> Path:
    """Tokenizer + tiny Llama + SFT on gold conversations of the train split, saved at out."""
    import yaml

    from aepo.models import build_model as new_llama
    from aepo.models import save
    from aepo.sft import sft
    from aepo.tasks.qa import QATask

    options = yaml.safe_load((HERE.parent / "qa.yaml").read_text())["task"]["options"]
    options = {
        k: str(HERE.parent.parent / v) if k in ("train", "eval") else v for k, v in options.items()
    }
    options["tools"]["search"]["corpus"] = str(HERE / "corpus.jsonl")
    task = QATask(**options, cache_dir=str(out.parent / ".aepo_cache"))
    tools = task.tools()
    train = task.samples("train")
    with open(HERE / "corpus.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts += [task.system_prompt()] + [gold_response(task, tools, s) for s in train]
    texts += [s["question"] for s in train]
    tok = build_tokenizer(texts)
    model = new_llama(tok, hidden=64, layers=2, heads=2, seed=seed)
    examples = [(task.encode_prompt(s, tok), gold_response(task, tools, s)) for s in train]
    sft(model, tok, examples, steps=steps, batch_size=16, lr=3e-3, seed=seed)
    return save(model, tok, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="store_true", help="rewrite the JSONL files too")
    parser.add_argument("--model", default=str(HERE / "model"), help="model folder to write")
    parser.add_argument("--steps", type=int, default=400, help="SFT steps")
    args = parser.parse_args(argv)
    if args.data:
        write_data()
    path = build_model(Path(args.model), steps=args.steps)
    print(f"model written: {path}")


if __name__ == "__main__":
    main()
