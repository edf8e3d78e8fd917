"""TTT-Discover (arXiv 2601.16175, "Learning to Discover at Test Time") on TRL's `GRPOTrainer`.

Reinforcement learning at test time on one problem: the goal is the single best verified construction, and the LoRA
adapter is a by-product. Every optimizer step:

1. the PUCT archive (`hf_ext.trainers.puct_archive`) picks `groups_per_batch` parent states from distinct lineages;
2. each parent is rendered as a prompt and the model samples `group_size` (K) completions at temperature 1;
3. the problem (`hf_ext.eval.discovery`) turns each completion into a new construction and verifies it exactly
   (model-written code runs in `hf_ext.eval.sandbox`); valid ones join the archive;
4. advantages per group: entropic with an adaptive beta (default), fixed beta, or the mean baseline, computed in
   float64; optionally each token's advantage is shaped towards the base model (the adapter disabled);
5. one optimizer step on the whole batch (`steps_per_generation == gradient_accumulation_steps`), then the archive is
   flushed and written (`archive.json`, `best_state.json`, `discovery.json`, `reward_curve.png`) with the checkpoint.

What TRL does unchanged: sampling from left-padded prompt ids with `generate`, log-probabilities of exactly the sampled
token ids (never decoded and re-encoded), the loss (`dr_grpo`: a constant normaliser, as the official token sum; with
one iteration per batch the importance ratio is 1, so clipping is inert). Overridden hooks, and only these:
`_generate_and_score_completions` (prompts from the archive, then the advantages and the archive update),
`_generate` (timing), `_save_checkpoint` and `train` (the archive
in every checkpoint and back on resume). specs/ttt_discover.md has the formulas and where paper and code differ.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset, DatasetDict
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from hf_ext.errors import UserInputError
from hf_ext.eval.discovery import Attempt, DiscoveryProblem, SandboxLimits, get_problem
from hf_ext.run_folder import RunFolder
from hf_ext.trainers.base import Stage, StageConfigMixin, StageTrainerMixin
from hf_ext.trainers.puct_archive import PUCTArchive, State

logger = logging.getLogger("hf_ext")

ESTIMATORS = ("entropic_adaptive_beta", "entropic", "mean_baseline")
CARD_DESCRIPTION = (
    "TTT-Discover (a `trl.GRPOTrainer` subclass): reinforcement learning at test time on one problem, with entropic "
    "advantages under an adaptive temperature and a PUCT archive of verified states; the adapter is a by-product of "
    "the search for the best construction."
)


# Advantages (float64 throughout: see `entropic_advantages`)
def tilted_kl(rewards: torch.Tensor, beta: float) -> float:
    """KL(softmax(beta * r) || uniform) = sum q (log q + log K), for one group of rewards."""
    log_q = torch.log_softmax(beta * rewards.double(), dim=0)
    return float((log_q.exp() * (log_q + math.log(rewards.numel()))).sum())


def adaptive_beta(rewards: torch.Tensor, budget: float = math.log(2)) -> float:
    """The smallest beta whose tilted distribution is `budget` nats from uniform (ln 2: its effective sample size
    halves): doubling from 1 up to 1e6 (best effort when the budget is unreachable, e.g. half the group ties at the
    maximum), then 60 bisection steps. Fewer than 2 rewards: 0."""
    if rewards.numel() < 2:
        return 0.0
    low, high = 0.0, 1.0
    while tilted_kl(rewards, high) < budget and high < 1e6:
        high *= 2.0
    if tilted_kl(rewards, high) < budget:
        return high
    for _ in range(60):
        middle = (low + high) / 2
        if tilted_kl(rewards, middle) < budget:
            low = middle
        else:
            high = middle
    return high


def entropic_advantages(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """A_i = e_i / mean_{j != i} e_j - 1 with e_i = exp(beta (r_i - max r)), for one group, in float64.

    The leave-one-out sum is a masked sum, never `sum(e) - e_i`: in float32 that difference cancels. With beta 1 and
    rewards [0, 0, 20.7] the best rollout's true A is ~1e9; the official form gets 0 / 0 + 1e-12, i.e. 1e12."""
    r = rewards.double()
    k = r.numel()
    e = torch.exp(beta * (r - r.max()))
    others = ~torch.eye(k, dtype=torch.bool, device=r.device)
    leave_one_out = (e.unsqueeze(0) * others).sum(dim=1) / (k - 1)
    return e / (leave_one_out + 1e-12) - 1.0


def group_advantages(
    rewards: torch.Tensor, estimator: str, beta: float = 2.0, budget: float = math.log(2)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout advantages of a `(groups, K)` reward matrix and each group's beta (float64). NaN rewards (rollouts
    without a reward) get advantage 0 and are left out of their group; a group with fewer than 2 rewards (3 for the
    adaptive estimator) gets 0 throughout."""
    advantages = torch.zeros_like(rewards, dtype=torch.float64)
    betas = torch.zeros(rewards.size(0), dtype=torch.float64)  # NaN for groups without a signal
    minimum = 3 if estimator == "entropic_adaptive_beta" else 2
    for row in range(rewards.size(0)):
        valid = ~torch.isnan(rewards[row])
        r = rewards[row][valid].double()
        if r.numel() < minimum or bool(r.max() == r.min()):  # a constant group carries no signal: exactly 0
            betas[row] = math.nan
            continue
        if estimator == "mean_baseline":
            advantages[row, valid] = r - r.mean()
            continue
        row_beta = adaptive_beta(r, budget) if estimator == "entropic_adaptive_beta" else beta
        betas[row] = row_beta
        advantages[row, valid] = entropic_advantages(r, row_beta)
    return advantages, betas


def kl_shaped_advantages(
    advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, batch_mean: float, coef: float
) -> torch.Tensor:
    """Per-token advantages `A_i + coef * mask * (mean d - d_t)` with d_t = log pi(y_t) - log pi_base(y_t) and its
    mean over every completion token of the batch (all processes): tokens that drifted further from the base than the
    batch average are pushed back."""
    return advantages.unsqueeze(1) + coef * mask * (batch_mean - log_ratio)


@dataclass
class HfExtTTTDiscoverConfig(StageConfigMixin, GRPOConfig):
    """`trl.GRPOConfig` with TTT-Discover's keys and the official code's defaults (docs/stages/ttt_discover.md).

    The batch is `groups_per_batch` x `group_size` rollouts, all in one optimizer step: `num_generations`,
    `generation_batch_size` and `gradient_accumulation_steps` are derived from them (and
    `per_device_train_batch_size`, the micro-batch of the loss)."""

    problem: str = field(
        default="golomb_ruler",
        metadata={"help": "The problem: golomb_ruler, spread_points (hf_ext.eval.discovery) or module:Class."},
    )
    problem_options: str | None = field(
        default=None, metadata={"help": 'The problem\'s options as a JSON or YAML mapping, e.g. {"max_length": 60}.'}
    )
    groups_per_batch: int = field(default=64, metadata={"help": "Parent states expanded per step (official: 64)."})
    group_size: int = field(default=8, metadata={"help": "Completions per parent, K (official: 8; >= 3 adaptive)."})
    advantage_estimator: str = field(
        default="entropic_adaptive_beta",
        metadata={"help": "entropic_adaptive_beta (paper), entropic (fixed beta) or mean_baseline.",
                  "choices": list(ESTIMATORS)},
    )
    entropic_beta: float = field(default=2.0, metadata={"help": "Beta of the fixed-beta entropic estimator."})
    kl_budget: float = field(
        default=math.log(2), metadata={"help": "Adaptive beta: KL(q_beta || uniform) to reach (ln 2: ESS halves)."}
    )
    kl_penalty_coef: float | None = field(
        default=None,
        metadata={"help": "Per-token KL shaping to the base model (lambda); None: 0.1 with a LoRA adapter, 0 without."},
    )
    drop_constant_groups: bool = field(
        default=True, metadata={"help": "Groups whose K rewards are equal take no part in the loss."}
    )
    invalid_reward: float | None = field(
        default=0.0,
        metadata={"help": "Reward of a rollout without a valid construction (official: 0); null: no reward (A = 0)."},
    )
    sampler: Literal["puct", "fixed"] = field(
        default="puct", metadata={"help": "puct (the archive) or fixed (always the initial states: no reuse)."}
    )
    puct_c: float = field(default=1.0, metadata={"help": "Exploration constant c of the PUCT score."})
    archive_topk_children: int = field(default=2, metadata={"help": "Children kept per parent at each flush."})
    archive_max_size: int = field(default=1000, metadata={"help": "States kept in the archive (plus initial ones)."})
    propagate_max_to_ancestors: bool = field(
        default=False, metadata={"help": "Update m(s) of every ancestor, not only the parent (the code: parent only)."}
    )
    sandbox_timeout: float = field(default=10.0, metadata={"help": "Wall-clock seconds per verification."})
    sandbox_memory_mb: int = field(default=1024, metadata={"help": "Address-space limit of a sandboxed program."})
    verifier_workers: int = field(default=2, metadata={"help": "Verifications run concurrently (threads/processes)."})
    # GRPO keys with the official code's values
    loss_type: str = field(default="dr_grpo", metadata={"help": "dr_grpo: a constant normaliser, as the official sum."})
    learning_rate: float = field(default=4e-5, metadata={"help": "Official: 4e-5, constant."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Official: constant, no warm-up."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Official: 0.95."})
    beta: float = field(default=0.0, metadata={"help": "GRPO's in-loss KL (k3); TTT-Discover shapes advantages instead."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (official: 1.0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps (official: 50, 25,600 rollouts)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rollouts per loss micro-batch."})
    max_completion_length: int | None = field(default=256, metadata={"help": "Tokens sampled per completion."})
    logging_steps: float = field(default=1, metadata={"help": "Log every step (each step is a whole batch)."})
    save_strategy: str = field(default="steps", metadata={"help": "A checkpoint (adapter + archive) every step."})
    save_steps: float = field(default=1, metadata={"help": "Checkpoint every `save_steps` steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})

    def __post_init__(self):
        import os

        if self.group_size < 2:
            raise UserInputError(f"group_size: must be at least 2 (got {self.group_size})")
        if self.advantage_estimator == "entropic_adaptive_beta" and self.group_size < 3:
            raise UserInputError(
                f"group_size: the adaptive-beta estimator needs at least 3 completions per group (got "
                f"{self.group_size}); with 2 the KL budget is reachable only by saturation (advantages ~1e12)"
            )
        if self.advantage_estimator not in ESTIMATORS:
            raise UserInputError(f"advantage_estimator: must be one of {', '.join(ESTIMATORS)}, got {self.advantage_estimator!r}")
        if self.sampler not in ("puct", "fixed"):
            raise UserInputError(f"sampler: must be puct or fixed, got {self.sampler!r}")
        self.problem_options_dict()  # a bad JSON or an unknown problem fails here, before any model loads
        get_problem(self.problem, self.problem_options_dict())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rollouts = self.groups_per_batch * self.group_size
        micro_batches = self.per_device_train_batch_size * world
        if self.groups_per_batch < 1 or self.groups_per_batch % world:
            raise UserInputError(
                f"groups_per_batch: {self.groups_per_batch} groups do not divide over {world} processes"
            )
        if rollouts % micro_batches:
            raise UserInputError(
                f"per_device_train_batch_size: {self.per_device_train_batch_size} x {world} processes does not divide "
                f"the {rollouts} rollouts of a step (groups_per_batch x group_size)"
            )
        if self.num_iterations != 1:
            raise UserInputError("num_iterations: must be 1 (the archive is updated once per batch of rollouts)")
        derived = {"num_generations": (self.group_size, 8), "generation_batch_size": (rollouts, None),
                   "gradient_accumulation_steps": (rollouts // micro_batches, 1)}
        for key, (value, default) in derived.items():  # GRPO keys that TTT-Discover's own keys determine
            if getattr(self, key) not in (value, default):
                raise UserInputError(
                    f"{key}: set by groups_per_batch, group_size and per_device_train_batch_size (here {value}); "
                    f"remove it from the recipe"
                )
        self.num_generations = self.group_size
        self.generation_batch_size = rollouts
        self.steps_per_generation = None
        self.gradient_accumulation_steps = rollouts // micro_batches  # one optimizer step per batch of rollouts
        try:
            super().__post_init__()
        except ValueError as error:
            raise UserInputError(str(error)) from None

    def problem_options_dict(self) -> dict:
        """`problem_options` as a mapping: JSON or YAML flow text (`{"max_length": 60}`, `{max_length: 60}`)."""
        import yaml

        if not self.problem_options:
            return {}
        options = self.problem_options
        if isinstance(options, str):
            try:
                options = yaml.safe_load(options)
            except yaml.YAMLError as error:
                raise UserInputError(f"problem_options: not a mapping ({' '.join(str(error).split())})") from None
        if not isinstance(options, dict):
            raise UserInputError(f"problem_options: must be a mapping of option names to values, got {options!r}")
        return options

    def new_archive(self) -> PUCTArchive:
        return PUCTArchive(
            c=self.puct_c, topk_children=self.archive_topk_children, max_size=self.archive_max_size,
            propagate_max_to_ancestors=self.propagate_max_to_ancestors, sampler=self.sampler,
        )


def run_attempts(function, jobs: list, workers: int, budget_per_round: float) -> list[Attempt]:
    """`function(job)` for every job on `workers` daemon threads. An in-process verifier cannot be interrupted: a job
    still running when the batch's budget (`budget_per_round` per round of workers, plus 1 s) is spent is an invalid
    attempt, and its thread, a daemon, neither blocks the run nor its exit."""
    import queue
    import threading

    results: list[Attempt | None] = [None] * len(jobs)
    pending: queue.Queue = queue.Queue()
    for index in range(len(jobs)):
        pending.put(index)

    def work() -> None:
        while True:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            results[index] = function(jobs[index])

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(workers, len(jobs))))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + budget_per_round * math.ceil(len(jobs) / len(threads)) + 1
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    while not pending.empty():  # jobs no thread reached in time
        pending.get_nowait()
    return [r if r is not None else Attempt(error="the verifier timed out") for r in results]


def initial_archive(problem: DiscoveryProblem, archive: PUCTArchive, groups: int) -> PUCTArchive:
    """`archive` holding `groups` independent initial states (the problem's constructions, each repeated evenly)."""
    constructions = problem.initial_constructions()
    for construction in constructions:
        value = problem.verify(construction)
        if value is None:
            raise UserInputError(f"problem {problem.name}: an initial construction does not verify: {construction}")
        for _ in range(max(1, groups // len(constructions))):
            archive.add_initial(construction, value, code=problem.initial_code(construction))
    return archive


def state_prompt(problem: DiscoveryProblem, state: State) -> str:
    return problem.render_prompt(state.construction, state.value, state.parent_value, state.code, state.output)


def model_prompt(problem: DiscoveryProblem, state: State, tokenizer, template_kwargs: dict | None = None) -> str | list[dict]:
    """The prompt of a state as the trainer gives it to TRL: a user turn for a model with a chat template; the text
    for one without. With the problem's `answer_prefix`, a text that ends with it: the chat template is applied here
    (TRL always adds a bare generation prompt to a conversation) and a BOS the tokenizer adds itself is not doubled."""
    text = state_prompt(problem, state)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not problem.answer_prefix:
        return [{"role": "user", "content": text}] if has_template else text
    if has_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False, **(template_kwargs or {}))
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
    return text + problem.answer_prefix


def completion_text(completion) -> str:
    """A completion as TRL passes it to reward functions: text, or a list of messages (the assistant's turn)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


@dataclass
class StepRecord:
    """One optimizer step of the search, as `discovery.json` lists it."""

    step: int
    rollouts: int
    valid_fraction: float
    reward_mean: float
    reward_max: float
    best_value: float
    archive_size: int
    beta_mean: float
    advantage_min: float
    advantage_max: float
    kl_to_base: float | None = None  # mean log pi - log pi_base over the batch's completion tokens (KL shaping on)
    invalid_reasons: dict = field(default_factory=dict)  # the most common errors of this step's invalid rollouts
    seconds: dict = field(default_factory=dict)


class HfExtTTTDiscoverTrainer(StageTrainerMixin, GRPOTrainer):
    _tag_names = ["trl", "ttt-discover", "hf_ext"]
    _name = "TTT-Discover"

    def __init__(self, model, args: HfExtTTTDiscoverConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, render_card=None, callbacks=None):
        self.problem: DiscoveryProblem = get_problem(args.problem, args.problem_options_dict())
        self.limits = SandboxLimits(timeout=args.sandbox_timeout, memory_mb=args.sandbox_memory_mb)
        self.archive = initial_archive(self.problem, args.new_archive(), args.groups_per_batch)
        self.history: list[dict] = []
        # (step, archive, history) as of the end of `step`, taken before the next step's rollouts (main process)
        self._search_at_step: tuple[int, PUCTArchive, list[dict]] | None = None
        self._parents: dict[int, State] = {}  # this process's parents of the current step
        self._step_parents: dict[int, State] = {}  # every process's
        self._rollouts: list[tuple[int, dict, float | None]] = []  # (parent id, attempt, reward) of this process
        self._generation_seconds = 0.0
        self._verification_seconds = 0.0
        self.last_batch: dict | None = None  # this process's last rollouts as the loss receives them (before shuffling)
        self._step_rollouts: list[tuple[int, dict, float | None]] = []  # every process's, in process order
        self._kl_to_base: float | None = None
        if train_dataset is None:
            train_dataset = Dataset.from_dict({"prompt": ["(rendered from the archive)"] * args.groups_per_batch})

        def verifier(prompts, completions, state_id, **kwargs):
            return self._verify(completions, state_id)

        verifier.__name__ = self.problem.name
        super().__init__(
            model=model, reward_funcs=[verifier], args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, render_card=render_card,
        )
        from accelerate.utils import is_peft_model

        self.kl_coef = args.kl_penalty_coef if args.kl_penalty_coef is not None else (0.1 if is_peft_model(self.model) else 0.0)
        if self.kl_coef > 0 and not is_peft_model(self.model):
            raise UserInputError("kl_penalty_coef: KL shaping needs the base model, i.e. a LoRA adapter (use_peft: true)")

    # prompts
    def render(self, state: State) -> str | list[dict]:
        return model_prompt(self.problem, state, self.processing_class, self.args.chat_template_kwargs)

    def _select_parents(self, count: int) -> list[State]:
        """`count` parents picked by the main process (it owns the archive) and sent to every process."""
        from accelerate.utils import broadcast_object_list

        picked = [self.archive.select(count) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(picked, from_process=0)
        return picked[0]

    # rewards
    def _verify(self, completions, state_ids) -> list[float | None]:
        """The reward of each completion (the problem's verifier; `invalid_reward` when there is no valid
        construction), keeping every attempt for the archive. A verifier that raises, returns NaN or is still running
        when the batch's time budget (twice the sandbox timeout per round of workers) is spent makes that rollout
        invalid; the run goes on."""
        start = time.perf_counter()
        prefix = self.problem.answer_prefix
        jobs = [(prefix + completion_text(c), self._parents[i]) for c, i in zip(completions, state_ids, strict=True)]

        def attempt(job) -> Attempt:
            text, parent = job
            try:
                result = self.problem.attempt(text, parent.construction, parent.code, self.limits)
            except Exception as error:  # a user's verifier: its failure is that rollout's, not the run's
                return Attempt(error=f"the verifier raised {type(error).__name__}: {error}")
            if result.value is not None and not math.isfinite(result.value):
                return Attempt(code=result.code, output=result.output, error="the verifier returned a non-finite value")
            return result

        def reward(attempt: Attempt) -> float | None:
            if attempt.valid:
                try:
                    value = float(self.problem.reward(attempt.value))
                    if math.isfinite(value):
                        return value
                except Exception:  # noqa: BLE001 - a user's reward function fails this rollout only
                    pass
            return self.args.invalid_reward

        attempts = run_attempts(attempt, jobs, self.args.verifier_workers, budget_per_round=2 * self.limits.timeout)
        rewards = [reward(a) for a in attempts]
        self._rollouts = [(i, asdict(a), r) for i, a, r in zip(state_ids, attempts, rewards, strict=True)]
        self._verification_seconds += time.perf_counter() - start
        return rewards

    def _key(self, attempt: dict) -> str | None:
        """The attempt's deduplication key; a problem whose `key` fails keeps the state without one."""
        try:
            return self.problem.key(attempt["construction"])
        except Exception as error:
            logger.warning("ttt_discover: %s.key failed (%s); the state is kept without deduplication",
                           type(self.problem).__name__, error)
            return None

    def _generate(self, prompts: list):
        start = time.perf_counter()
        result = super()._generate(prompts)
        self._generation_seconds += time.perf_counter() - start
        return result

    # the step
    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        self._generation_seconds = self._verification_seconds = 0.0
        self._kl_to_base = None
        k = self.num_generations
        groups_here = len(inputs) // k
        parents = self._select_parents(groups_here * self.accelerator.num_processes)
        self._step_parents = {p.id: p for p in parents}  # a parent may leave the archive before its update
        mine = parents[self.accelerator.process_index * groups_here:(self.accelerator.process_index + 1) * groups_here]
        self._parents = {p.id: p for p in mine}
        rows = [{"prompt": self.render(p), "state_id": p.id} for p in mine for _ in range(k)]
        output = super()._generate_and_score_completions(rows)

        # every process's rollouts, in process order; rewards in float64 (TRL's reward matrix is float32, which
        # would turn close values such as 0.51762 and 0.51763 into ties)
        self._step_rollouts = gather_object(self._rollouts) if self.accelerator.num_processes > 1 else self._rollouts
        weight = float(self.reward_weights[0])
        rewards = torch.tensor([math.nan if r is None else weight * r for _, _, r in self._step_rollouts], dtype=torch.float64)
        advantages, betas = group_advantages(
            rewards.view(-1, k), self.args.advantage_estimator, self.args.entropic_beta, self.args.kl_budget
        )
        local = slice(self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows))
        device = output["completion_ids"].device
        local_advantages = advantages.flatten()[local].to(device=device, dtype=torch.float32)
        if self.args.drop_constant_groups:  # groups without a signal (equal rewards, too few valid ones): A == 0
            constant = (advantages.view(-1, k) == 0).all(dim=1).repeat_interleave(k)[local]
            output["completion_mask"] = output["completion_mask"] * (~constant).to(device).unsqueeze(1).int()
            output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        if self.kl_coef > 0:
            local_advantages = self._kl_shaped(output, local_advantages)
        output["advantages"] = local_advantages
        self.last_batch = {"completion_ids": output["completion_ids"].clone(), "advantages": local_advantages.clone(),
                           "completion_mask": output["completion_mask"].clone()}
        for _ in range(rewards.numel()):  # GRPO logged its own group-normalised advantages for the completions table
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(advantages.flatten().tolist())

        self._update_archive(rewards, advantages, betas, time.perf_counter() - start)
        return output

    def _kl_shaped(self, output: dict, advantages: torch.Tensor) -> torch.Tensor:
        """Advantages shaped per token towards the base model (the adapter disabled), on the sampled token ids."""
        from trl.trainer.utils import use_adapter

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        batch = self.args.per_device_train_batch_size
        with torch.no_grad():
            policy, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch_size=batch)
            with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None):
                base, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch_size=batch)
        mask = output["completion_mask"].to(policy.dtype)
        log_ratio = (policy - base) * mask
        totals = self.accelerator.gather(torch.stack([log_ratio.sum(), mask.sum()]).unsqueeze(0)).sum(dim=0)
        batch_mean = (totals[0] / totals[1].clamp(min=1.0)).item()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ttt/kl_to_base"].append(batch_mean)
        self._kl_to_base = batch_mean
        return kl_shaped_advantages(advantages, log_ratio, mask, batch_mean, self.kl_coef)

    def _update_archive(self, rewards: torch.Tensor, advantages: torch.Tensor, betas: torch.Tensor, seconds: float):
        """Every process's rollouts into the archive (main process), flushed; metrics and the per-step files."""
        rollouts = self._step_rollouts
        step = self.state.global_step + 1
        mode = "train" if self.model.training else "eval"
        valid = sum(1 for _, attempt, _ in rollouts if attempt["value"] is not None)
        if self.accelerator.is_main_process:
            if not self.args.skip_nonfinite_steps:
                # the search as of the last finished step, for a checkpoint written before this step finishes (the
                # stop after a non-finite gradient saves the weights of the step before)
                self._search_at_step = (step - 1, copy.deepcopy(self.archive), list(self.history))
            for state_id, attempt, _ in rollouts:
                parent = self._step_parents[state_id]
                key = self._key(attempt) if attempt["value"] is not None else None
                self.archive.record(
                    parent, attempt["construction"], attempt["value"], key=key, code=attempt["code"],
                    output=attempt["output"], step=step,
                )
            self.archive.flush()
        finite = rewards[~torch.isnan(rewards)]
        record = StepRecord(
            step=step, rollouts=len(rollouts), valid_fraction=valid / max(1, len(rollouts)),
            reward_mean=float(finite.mean()) if finite.numel() else float("nan"),
            reward_max=float(finite.max()) if finite.numel() else float("nan"),
            best_value=self.archive.best.value if self.archive.best is not None else float("nan"),
            archive_size=len(self.archive.states),
            beta_mean=float(betas[~torch.isnan(betas)].mean()) if (~torch.isnan(betas)).any() else float("nan"),
            advantage_min=float(advantages.min()), advantage_max=float(advantages.max()), kl_to_base=self._kl_to_base,
            invalid_reasons=dict(Counter(a["error"][:80] for _, a, _ in rollouts if a["value"] is None).most_common(5)),
            seconds={"generation": self._generation_seconds, "verification": self._verification_seconds,
                     "rollouts_total": seconds},
        )
        self.history.append(asdict(record))
        metrics = self._metrics[mode]
        metrics["ttt/valid_fraction"].append(record.valid_fraction)
        metrics["ttt/best_value"].append(record.best_value)
        metrics["ttt/archive_size"].append(record.archive_size)
        metrics["ttt/beta_mean"].append(record.beta_mean)
        metrics["ttt/advantage_max"].append(record.advantage_max)
        metrics["ttt/total_rollouts"].append(self.archive.total_visits)
        metrics["timing/generation_seconds"].append(self._generation_seconds)
        metrics["timing/verification_seconds"].append(self._verification_seconds)
        if self.accelerator.is_main_process:
            self.write_search(Path(self.args.output_dir))

    # files and resume
    def write_search(self, folder: Path, archive: PUCTArchive | None = None, history: list[dict] | None = None) -> None:
        """The archive, its best state, the per-step record and the reward curve (default: the search so far)."""
        archive = self.archive if archive is None else archive
        history = self.history if history is None else history
        run = RunFolder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run.write_discovery(archive.to_dict(), self.best_state(archive), history)
        run.plot_reward_curve(history, f"ttt_discover: {self.problem.name}")

    def best_state(self, archive: PUCTArchive | None = None) -> dict:
        archive = self.archive if archive is None else archive
        best = archive.best
        return {
            "problem": self.problem.name,
            "value": best.value if best else None,
            "state": asdict(best) if best else None,
            "lineage": archive.best_lineage,
            "verified": best is not None and self.problem.verify(best.construction) == best.value,
            "rollouts": archive.total_visits,
        }

    def _save_checkpoint(self, model, trial):
        """The search's files go into the checkpoint folder first, before transformers writes the trainer state that
        makes it a checkpoint: a run killed in between never leaves a checkpoint without its archive. A checkpoint
        written in the middle of a step (the stop after a non-finite gradient) holds the search as of the step before,
        as its weights do: a resume redoes the step's rollouts instead of counting them twice."""
        if self.is_world_process_zero():
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            checkpoint = Path(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            snapshot = self._search_at_step
            if snapshot is not None and snapshot[0] == self.state.global_step:  # taken during the step after it
                self.write_search(checkpoint, *snapshot[1:])
            else:
                self.write_search(checkpoint)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """TRL's `train`, with the archive and the search record read back from the checkpoint resumed from (the
        archive's settings are the recipe's, its states, visits and best state the checkpoint's)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = RunFolder(self.args.output_dir).latest_checkpoint()
        if checkpoint:
            archive, history = RunFolder(checkpoint).read_discovery()
            if archive is None:
                raise UserInputError(
                    f"resume_from_checkpoint: {checkpoint} has no archive.json (not a ttt_discover checkpoint); "
                    "resume from another checkpoint or start a new run"
                )
            self.archive = PUCTArchive.from_dict(archive, **self.args.new_archive().settings())
            self.history = history
            logger.info("ttt_discover: resumed the archive (%d states, %d rollouts) from %s",
                        len(self.archive.states), self.archive.total_visits, checkpoint)
        return super().train(resume_from_checkpoint=checkpoint or resume_from_checkpoint, **kwargs)


class TTTDiscoverStage(Stage):
    """Test-time RL on one problem: the best verified construction, found by a model that learns while it searches."""

    name = "ttt_discover"
    config_class = HfExtTTTDiscoverConfig
    trainer_class = HfExtTTTDiscoverTrainer
    card_description = CARD_DESCRIPTION
    card_template = "ttt_discover.md"
    loss_label = "policy-gradient loss"
    built_in_data = True

    def load_model(self, recipe, tokenizer):
        args = recipe.training_args
        if args.kl_penalty_coef and not recipe.model_args.use_peft:  # checked before the model loads
            raise UserInputError(
                "kl_penalty_coef: KL shaping needs the base model, i.e. a LoRA adapter (use_peft: true); "
                "set kl_penalty_coef: 0 to train the full model"
            )
        return super().load_model(recipe, tokenizer)

    def build_datasets(self, script_args, training_args: HfExtTTTDiscoverConfig, tokenizer) -> DatasetDict:
        """One placeholder row per group: the prompts come from the archive at every step."""
        return DatasetDict(
            {"train": Dataset.from_dict({"prompt": ["(rendered from the archive)"] * training_args.groups_per_batch})}
        )

    def final_metrics(self, trainer: HfExtTTTDiscoverTrainer) -> dict:
        history = trainer.history
        seconds = {key: sum(h["seconds"].get(key, 0.0) for h in history) for key in ("generation", "verification", "rollouts_total")}
        step_times = trainer.state.log_history
        train_seconds = next((h["train_runtime"] for h in reversed(step_times) if "train_runtime" in h), None)
        rollouts = trainer.archive.total_visits
        return {
            "discovery": {
                **trainer.best_state(),
                "valid_fraction": sum(h["valid_fraction"] * h["rollouts"] for h in history) / max(1, sum(h["rollouts"] for h in history)),
                "archive_size": len(trainer.archive.states),
                "best_value_per_step": [h["best_value"] for h in history],
                "seconds": {**seconds, "training": None if train_seconds is None else train_seconds - seconds["rollouts_total"]},
                "rollouts_per_second": rollouts / train_seconds if train_seconds else None,
            }
        }

    def card_data(self, recipe, metrics: dict) -> dict:
        data = super().card_data(recipe, metrics)
        data["tags"] = [*data["tags"], "ttt-discover", "reinforcement-learning"]
        return data

    def card_variables(self, recipe, metrics: dict) -> dict:
        from hf_ext.model_card import hub_base_model

        variables = super().card_variables(recipe, metrics)
        discovery = metrics.get("discovery", {})
        args = recipe.training_args
        variables.update(
            summary=f"TTT-Discover of {hub_base_model(recipe) or recipe.model_args.model_name_or_path} on the "
            f"`{args.problem}` problem.",
            problem=args.problem,
            best_value=discovery.get("value"),
            best_construction=json.dumps((discovery.get("state") or {}).get("construction")),
            rollouts=discovery.get("rollouts"),
            valid_fraction=discovery.get("valid_fraction"),
            estimator=args.advantage_estimator,
            groups=args.groups_per_batch,
            group_size=args.group_size,
        )
        return variables
