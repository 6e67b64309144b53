"""Entropy-balanced branching policy (AEPO_SPEC section 3): pure functions and a per-prompt
planner. No engine import; every random draw derives from (seed, step, prompt, path, ...).

- :func:`global_budget`: pre-monitoring splits k into m global (root) samples.
- :func:`branch_probability`: the consecutive-branch-penalised branch probability.
- :class:`PromptPlanner`: applies both to one prompt's paths, keeps the budget exact and logs
  every decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("aepo", "aepo-fixed", "arpo", "flat")


@dataclass(frozen=True)
class BranchConfig:
    """How one prompt's k trajectories branch (AEPO_SPEC section 3); the defaults of the
    trainer's ``rollout`` section and of the functions below."""

    mode: str = "aepo"  # aepo (dynamic m + penalty), aepo-fixed, arpo (no penalty), flat
    k: int = 8  # trajectories per prompt
    m_fixed: int | None = None  # global samples in fixed modes (None: k // 2)
    beta: float = 0.5  # pre-monitoring sharpness
    tau: float = 0.5  # branch threshold
    gamma: float = 0.2  # entropy-difference weight
    lam: float = 0.05  # consecutive-branch penalty (arpo: forced to 0)
    z: int = 1  # continuations sampled per fork

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"branching mode {self.mode!r} is not one of: {', '.join(MODES)}")
        if self.k < 1 or self.z < 1:
            raise ValueError(f"k and z must be >= 1, got k={self.k}, z={self.z}")
        if self.m_fixed is not None and not 1 <= self.m_fixed <= self.k:
            raise ValueError(f"m_fixed must be in [1, k={self.k}], got {self.m_fixed}")


def global_budget(k: int, h_root: float, h_tool: float, *, beta: float = BranchConfig.beta) -> int:
    """m = clamp(ceil(k * sigmoid(beta * (H_root - H_tool))), 1, k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = math.ceil(k / (1.0 + math.exp(-beta * (h_root - h_tool))))
    return min(max(m, 1), k)


def branch_probability(
    delta_h: float,
    consecutive: int,
    *,
    tau: float = BranchConfig.tau,
    gamma: float = BranchConfig.gamma,
    lam: float = BranchConfig.lam,
) -> float:
    """P = clip(1 - tau / (1 - lam * l) + gamma * dH, 0, 1), and 0 once lam * l >= 1.

    Exactly the law of the released rule "branch iff (U + gamma dH)(1 - lam l) >= tau",
    U ~ Uniform(0, 1): for 1 - lam l > 0 that is U >= tau / (1 - lam l) - gamma dH.
    """
    if consecutive < 0:
        raise ValueError(f"consecutive must be >= 0, got {consecutive}")
    damp = 1.0 - lam * consecutive
    if damp <= 0:
        return 0.0
    return min(max(1.0 - tau / damp + gamma * delta_h, 0.0), 1.0)


def uniform(*key: int) -> float:
    """A U(0, 1) draw that depends only on the integer ``key`` (seed, step, prompt, ...)."""
    return float(np.random.default_rng([abs(int(k)) for k in key]).random())


def seed_for(*key: int) -> int:
    """A 31-bit sampling seed that depends only on ``key``."""
    return int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1)[0] >> 1)


@dataclass(frozen=True)
class BranchDecision:
    """One logged decision at tool step ``tool_step`` of ``path``."""

    prompt: int
    path: int
    tool_step: int
    h_seg: float
    h_root: float
    delta_h: float
    consecutive: int
    probability: float
    draw: float
    branched: bool
    children: tuple[int, ...]
    reason: str  # "draw", "no budget", "flat"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptPlanner:
    """Budget and branching decisions of one prompt.

    Drive it with: :meth:`start` (the first roots), :meth:`set_global_budget` after the probe
    (aepo mode), :meth:`decide` after the first W tokens following each tool result,
    :meth:`refill` when no path of the prompt is active. It never creates more than k paths.
    """

    config: BranchConfig
    prompt: int
    seed: int = 0
    step: int = 0
    m: int | None = None
    created: int = 0
    decisions: list[BranchDecision] = field(default_factory=list)

    def _new_paths(self, n: int) -> list[int]:
        n = max(0, min(n, self.config.k - self.created))
        ids = list(range(self.created, self.created + n))
        self.created += n
        return ids

    @property
    def budget_left(self) -> int:
        return self.config.k - self.created

    @property
    def needs_probe(self) -> bool:
        return self.config.mode == "aepo" and self.m is None

    def start(self) -> list[int]:
        """Path ids to sample from the root now: the probe (aepo), m roots (fixed modes) or
        all k (flat)."""
        c = self.config
        if c.mode == "flat":
            self.m = c.k
        elif c.mode != "aepo":
            self.m = c.m_fixed if c.m_fixed is not None else max(1, c.k // 2)
        return self._new_paths(1 if self.m is None else self.m)

    def set_global_budget(self, h_root: float, h_tool: list[float]) -> list[int]:
        """After the probe: m from its entropies (H_tool = H_root when it used no tool).
        Returns the ids of the m - 1 further roots (the probe is kept as one of the m)."""
        mean_tool = sum(h_tool) / len(h_tool) if h_tool else h_root
        self.m = global_budget(self.config.k, h_root, mean_tool, beta=self.config.beta)
        return self._new_paths(self.m - self.created)

    def decide(self, path: int, tool_step: int, h_seg: float, h_root: float, consecutive: int):
        """Branch decision for ``path`` at tool step ``tool_step`` (aligned timing: ``h_seg`` is
        the entropy of the continuation after that tool result). Returns the decision; its
        ``children`` are the new path ids to fork at the end of that tool result."""
        c = self.config
        if self.m is None:
            raise RuntimeError("decide() before the global budget is set (probe not finished)")
        lam = 0.0 if c.mode == "arpo" else c.lam
        dh = h_seg - h_root
        p = branch_probability(dh, consecutive, tau=c.tau, gamma=c.gamma, lam=lam)
        u = uniform(self.seed, self.step, self.prompt, path, tool_step, 0xB7A7C4)
        if c.mode == "flat":
            want, reason = False, "flat"
        else:
            want, reason = u < p, "draw"
        children: tuple[int, ...] = ()
        if want:
            children = tuple(self._new_paths(c.z))
            reason = "draw" if children else "no budget"
        decision = BranchDecision(
            self.prompt,
            path,
            tool_step,
            h_seg,
            h_root,
            dh,
            consecutive,
            p,
            u,
            bool(children),
            children,
            reason,
        )
        self.decisions.append(decision)
        return decision

    def refill(self) -> list[int]:
        """A fresh root when the prompt has no active path but budget left."""
        return self._new_paths(1) if self.m is not None else []
