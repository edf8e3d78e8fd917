"""The state archive of TTT-Discover: which states to expand next (PUCT), and what to remember of each.

Follows the official sampler (`tinker_cookbook/recipes/ttt/sampler.py::PUCTSampler`; specs/ttt_discover.md section 5):

    score(s) = Q(s) + c * scale * P(s) * sqrt(1 + T) / (1 + n(s))

- `Q(s)`: the best value among the children generated from s once s was expanded (`n(s) > 0` and a valid child),
  else s's own value `R(s)`;
- `P(s) ∝ N - rank(s)`, rank 0 the best of the N states: a rank-linear prior, best / worst = N;
- `scale = max R - min R` over the archive, without the initial states when there are others (floor 1e-6);
- `n(s)`: expansions of s or of any descendant; `T`: all expansions.

Selection sorts by (score, value) and picks greedily, skipping every state in the lineage (ancestors and
descendants) of a state already picked, so one batch explores different branches. After each step `flush` keeps the
best `topk_children` children per parent (and every parentless state) and at most `max_size` states (the initial
ones, then by value). The archive is a JSON document (`to_dict` / `from_dict`) so a killed run resumes with it.

`sampler="fixed"` always expands the initial states (no reuse: Best-of-N sampling of the start); the official
`greedy` ablation is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class State:
    """One construction in the archive, with what the prompt of its expansion shows."""

    id: int
    construction: Any
    value: float
    code: str | None = None
    output: str = ""
    parent_id: int | None = None
    parent_value: float | None = None
    ancestors: list[int] = field(default_factory=list)  # parent first, root last
    step: int = 0  # the optimizer step whose rollouts found it (0: initial)

    @property
    def is_initial(self) -> bool:
        return self.parent_id is None


class PUCTArchive:
    def __init__(
        self,
        c: float = 1.0,
        topk_children: int = 2,
        max_size: int = 1000,
        propagate_max_to_ancestors: bool = False,
        sampler: str = "puct",
    ):
        if sampler not in ("puct", "fixed"):
            raise ValueError(f"sampler must be puct or fixed, got {sampler!r}")
        self.c, self.topk_children, self.max_size = c, topk_children, max_size
        self.propagate_max_to_ancestors, self.sampler = propagate_max_to_ancestors, sampler
        self.states: dict[int, State] = {}
        self.visits: dict[int, int] = {}  # n(s)
        self.best_child_value: dict[int, float] = {}  # m(s)
        self.total_visits = 0  # T
        self.keys: dict[str, int] = {}  # construction key -> state id (deduplication)
        self.next_id = 0
        self.best: State | None = None
        self.best_lineage: list[dict] = []  # the best state's ancestors as found (id, value, step), parent first

    # building
    def add_initial(self, construction: Any, value: float, code: str | None = None) -> State:
        """A root state (initial states are never deduplicated: each is an independent start)."""
        state = State(self.next_id, construction, float(value), code=code)
        self._insert(state)
        return state

    def _insert(self, state: State) -> None:
        self.next_id = max(self.next_id, state.id + 1)
        self.states[state.id] = state
        self.visits.setdefault(state.id, 0)
        if self.best is None or state.value > self.best.value:
            self.best = state
            self.best_lineage = [
                {"id": i, "value": self.states[i].value, "step": self.states[i].step} for i in state.ancestors
                if i in self.states
            ]

    # PUCT
    def prior(self) -> dict[int, float]:
        """P(s) ∝ N - rank(s), rank 0 the best (ties keep insertion order)."""
        ranked = sorted(self.states, key=lambda i: -self.states[i].value)
        count = len(ranked)
        total = count * (count + 1) / 2
        return {state_id: (count - rank) / total for rank, state_id in enumerate(ranked)}

    def scale(self) -> float:
        values = [s.value for s in self.states.values() if not s.is_initial]
        if not values:
            values = [s.value for s in self.states.values()]
        return max(max(values) - min(values), 1e-6)

    def q_value(self, state_id: int) -> float:
        if self.visits[state_id] > 0 and state_id in self.best_child_value:
            return self.best_child_value[state_id]
        return self.states[state_id].value

    def scores(self) -> dict[int, float]:
        prior, scale, exploration = self.prior(), self.scale(), math.sqrt(1 + self.total_visits)
        return {
            i: self.q_value(i) + self.c * scale * prior[i] * exploration / (1 + self.visits[i]) for i in self.states
        }

    def lineage(self, state_id: int) -> set[int]:
        """The state, its ancestors and its descendants."""
        ancestors = set(self.states[state_id].ancestors)
        descendants = {i for i, s in self.states.items() if state_id in s.ancestors}
        return {state_id} | ancestors | descendants

    def select(self, count: int) -> list[State]:
        """`count` states to expand: the best scores from distinct lineages; when fewer lineages exist than
        `count`, the picks are repeated in order."""
        if self.sampler == "fixed":
            roots = [s for s in self.states.values() if s.is_initial]
            return [roots[i % len(roots)] for i in range(count)]
        scores = self.scores()
        order = sorted(self.states, key=lambda i: (scores[i], self.states[i].value), reverse=True)
        picked: list[int] = []
        blocked: set[int] = set()
        for state_id in order:
            if len(picked) == count:
                break
            if state_id in blocked:
                continue
            picked.append(state_id)
            blocked |= self.lineage(state_id)
        return [self.states[picked[i % len(picked)]] for i in range(count)]

    # updates
    def record(
        self, parent: State, construction: Any = None, value: float | None = None, key: str | None = None,
        code: str | None = None, output: str = "", step: int = 0,
    ) -> State | None:
        """One rollout from `parent`: a valid child (`value` not None) updates m(parent) and joins the archive unless
        its `key` is already there; any rollout adds a visit to the parent and every ancestor. The new state, or
        None (invalid or duplicate)."""
        self.total_visits += 1
        for state_id in [parent.id, *parent.ancestors]:
            if state_id in self.visits:
                self.visits[state_id] += 1
        if value is None or not math.isfinite(value):
            return None
        targets = [parent.id, *parent.ancestors] if self.propagate_max_to_ancestors else [parent.id]
        for state_id in targets:
            if state_id in self.states:
                self.best_child_value[state_id] = max(self.best_child_value.get(state_id, -math.inf), value)
        if key is not None and key in self.keys:
            return None
        child = State(
            self.next_id, construction, float(value), code=code, output=output, parent_id=parent.id,
            parent_value=parent.value, ancestors=[parent.id, *parent.ancestors], step=step,
        )
        self._insert(child)
        if key is not None:
            self.keys[key] = child.id
        return child

    def flush(self) -> None:
        """Keep the best `topk_children` children of each parent and every root; then at most `max_size` states."""
        children: dict[int, list[State]] = {}
        for state in self.states.values():
            if not state.is_initial:
                children.setdefault(state.parent_id, []).append(state)
        keep = {i for i, s in self.states.items() if s.is_initial}
        for siblings in children.values():
            siblings.sort(key=lambda s: (-s.value, s.id))
            keep |= {s.id for s in siblings[: self.topk_children]}
        if len(keep) > self.max_size:
            roots = [i for i in keep if self.states[i].is_initial]
            others = sorted((i for i in keep if not self.states[i].is_initial), key=lambda i: -self.states[i].value)
            keep = set(roots) | set(others[: max(0, self.max_size - len(roots))])
        for state_id in list(self.states):
            if state_id not in keep:
                del self.states[state_id]
                self.visits.pop(state_id, None)
                self.best_child_value.pop(state_id, None)
        self.keys = {k: i for k, i in self.keys.items() if i in self.states}

    # persistence
    def settings(self) -> dict:
        return {"c": self.c, "topk_children": self.topk_children, "max_size": self.max_size,
                "propagate_max_to_ancestors": self.propagate_max_to_ancestors, "sampler": self.sampler}

    def to_dict(self) -> dict:
        return {
            "settings": self.settings(),
            "total_visits": self.total_visits,
            "next_id": self.next_id,
            "states": [
                {**asdict(s), "visits": self.visits[s.id], "best_child_value": self.best_child_value.get(s.id)}
                for s in self.states.values()
            ],
            "keys": self.keys,
            "best": asdict(self.best) if self.best is not None else None,
            "best_lineage": self.best_lineage,
        }

    @classmethod
    def from_dict(cls, data: dict, **settings) -> PUCTArchive:
        """The archive `to_dict` wrote; `settings` (the constructor's keys) replace the saved ones."""
        archive = cls(**{**data["settings"], **settings})
        for record in data["states"]:
            record = dict(record)
            visits, best_child = record.pop("visits"), record.pop("best_child_value")
            state = State(**record)
            archive.states[state.id] = state
            archive.visits[state.id] = visits
            if best_child is not None:
                archive.best_child_value[state.id] = best_child
        archive.total_visits, archive.next_id = data["total_visits"], data["next_id"]
        archive.keys = {k: int(i) for k, i in data["keys"].items()}
        archive.best = State(**data["best"]) if data["best"] is not None else None
        archive.best_lineage = data["best_lineage"]
        return archive
