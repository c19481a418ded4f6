"""LoT: Learning from Teaching regularisation (Jin, Che et al. 2024), one file, top to bottom.

A teacher learns its task while staying easy to imitate: K students imitate it (KL(T||S), N student updates
per teacher update) and the teacher is pulled towards what the students learned (KL(S||T)):

    L_T = CE(teacher(x), y) + alpha * sum_i lambda_i * KL(S_i || T)      (gradient into the teacher only)
    L_S = [CE(S_i(x), y)]   + alpha * KL(T || S_i)                        (gradient into the student only)

One teacher step = a joint step of teacher and students on one batch, then N-1 student-only steps on an
independent batch stream, with the teacher's forward under no_grad. `arm: teacher_only` trains the teacher
alone (no student is built) for the same number of teacher steps, times `budget_multiplier` when the sweep
matches total model-steps. Works for text and image classification and for language modelling.

One stopping rule for every arm: an epoch is `steps_per_epoch` teacher steps whatever the arm (a longer budget
runs more epochs, never longer ones), so the evaluation grid, `patience` and `lr_decay_on_plateau` count the
same teacher steps in every arm (epochs (1 + N) times longer would make a model-steps arm's patience (1 + N)
times more lenient, and two teacher-only arms of one model would stop by different rules).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from teachsweep import distributed, models, tasks
from teachsweep.jobs import ArmPlan, JobSpec
from teachsweep.jobs.teacher import TeacherConfig
from teachsweep.metrics import paired_difference, per_seed, summarize
from teachsweep.packing import (
    StackedModel,
    StackedOptimizer,
    check_members_share,
    detached,
    evaluate_pack,
    leave,
    member_column,
    member_cross_entropy,
    restore_stacks,
    stack_batches,
)
from teachsweep.reporter import PackReporter, Reporter
from teachsweep.training import (
    DataConfig,
    OptimizerConfig,
    TaskData,
    autocast,
    evaluate,
    make_optimizer,
    pick_device,
    replay,
    restore_into,
    schedule_factor,
    state_of,
    synchronize,
    to_device,
    update,
)
from teachsweep.validation import checks_files

# ---------------------------------------------------------------------------------------------- config


class LoTTermConfig(BaseModel):
    """The LoT regulariser's fields, shared by the supervised and the RL job: a config mixin."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0)
    temperature: float = Field(1.5, gt=0)
    num_students: int = Field(1, ge=1, description="K students in the teacher's regulariser")
    student_weights: list[float] | None = None  # lambda_i; default 1/K each
    symmetric_kl: bool = False  # teacher term alpha * [KL(S||T) + KL(T||S)]

    @model_validator(mode="after")
    def _weights_match_students(self):
        if self.student_weights is not None:
            if len(self.student_weights) != self.num_students:
                raise ValueError("student_weights needs one weight per student (num_students)")
            if any(w < 0 for w in self.student_weights):
                raise ValueError("student_weights must be >= 0")
        return self

    @property
    def lambdas(self) -> list[float]:
        return self.student_weights or [1.0 / self.num_students] * self.num_students


class LoTConfig(DataConfig, OptimizerConfig, LoTTermConfig):
    model_config = ConfigDict(extra="forbid")

    teacher: str = "minilm:2"
    student: str | None = None  # default: the teacher's architecture
    arm: Literal["lot", "teacher_only"] = "lot"

    student_steps: int = Field(2, ge=1, description="N: student updates per teacher update")
    student_ce: bool = True  # students also fit the labels (the public code's default `kl_ce`)
    detach: bool = True  # each model's distillation target is detached from the other's graph

    epochs: int = Field(3, ge=1)
    patience: int | None = Field(None, ge=1)  # stop when the teacher's validation score has not improved for this
    # many epochs (training "to convergence"); None: train every epoch
    budget_multiplier: float = Field(1.0, ge=1)  # teacher-only arm at matched model-steps: x the epochs
    # Divide every model's learning rate by this after an evaluation without a better teacher validation score
    # (the LSTM language-model recipe LoT's LM experiments follow divides by 4); None: no annealing.
    lr_decay_on_plateau: float | None = Field(None, gt=1)

    checkpoint_every: int = Field(1, ge=0)  # epochs between checkpoints a restarted trial resumes from; 0: none
    # After training, a fresh student of the student architecture imitates the best-validation teacher for this
    # many steps (`imitation_probe`): how easy the teacher is to imitate, the same protocol for every arm.
    imitation_steps: int | None = Field(None, ge=1)

    @field_validator("teacher", "student")
    @classmethod
    def _known_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else models.validate_model_name(value, check_files=checks_files(info))

    @model_validator(mode="after")
    def _models_fit_the_task(self, info: ValidationInfo) -> LoTConfig:
        kind = tasks.task_kind(self.task)
        for name in (self.teacher, self.student):
            if name is not None and kind is not None:
                models.validate_model_name(name, kind, check_files=checks_files(info))
        return self


def metrics(cfg: LoTConfig) -> dict[str, str | None]:
    """What `train` reports for this config: accuracy (classification) or perplexity (language modelling)."""
    kind = tasks.task_kind(cfg.task)  # None for a hub dataset: either
    scores = (
        {"acc": "max"}
        if kind in ("text", "image")
        else {"ppl": "min"}
        if kind == "lm"
        else {"acc": "max", "ppl": "min"}
    )
    out: dict[str, str | None] = {}
    for score, mode in scores.items():
        out |= {f"teacher/{split}_{score}": mode for split in ("val", "test", "best_val")}
        out[f"teacher/test_{score}_at_best_val"] = mode
        if cfg.arm == "lot":
            out |= {f"student/{split}_{score}": mode for split in ("val", "test")}
            if cfg.num_students > 1:
                out |= {
                    f"student{i}/{split}_{score}": mode for i in range(cfg.num_students) for split in ("val", "test")
                }
            if score == "acc":
                out |= {"agreement/val": "max", "agreement/test": "max"}
    out |= {
        "loss/teacher": "min",
        "loss/student": "min",
        "steps/teacher": None,
        "steps/student": None,
        "steps/model": None,
        "steps/teacher_at_best_val": None,
        "steps/model_at_best_val": None,
        "best_epoch": None,
        "time/teacher_step_s": "min",
        "time/train_s": "min",
        "lr/teacher": None,
    }
    if kind in ("text", "image"):
        out |= {"examples/val": None, "examples/test": None}
    if cfg.imitation_steps is not None:
        out |= {f"imitation/{split}_kl": "min" for split in ("val", "test")}
        if kind != "lm":
            out |= {f"imitation/{split}_agreement": "max" for split in ("val", "test")}
    return out


@dataclass(frozen=True)
class TeacherOnlyFields:
    """What a teacher-only arm makes of a LoT config (of the supervised or the RL job): the fields that only shape
    how the students pull on the teacher, which it ignores, and those that set how much the students train, which
    only its model-steps budget (`budget_multiplier`) depends on."""

    config: type[BaseModel]
    pull: frozenset[str]
    students: frozenset[str]
    multiplier: Callable[[dict[str, Any]], float]  # a LoT trial's model-steps budget, from its recorded config


def model_steps_multiplier(params: dict[str, Any]) -> float:
    """1 + N*K: the model steps of a LoT trial per teacher step."""
    cfg = filled(params, LoTConfig)
    return float(1 + cfg["student_steps"] * cfg["num_students"])


def filled(params: dict[str, Any], config: type[BaseModel]) -> dict[str, Any]:
    """A row's recorded config with the config's defaults for what it does not record."""
    out = {name: info.get_default(call_default_factory=True) for name, info in config.model_fields.items()}
    return out | {k: None if v == "None" else v for k, v in params.items() if k in out}  # (MLflow's None)


PULL_FIELDS = frozenset(LoTTermConfig.model_fields) - {"num_students"}
FIELDS = TeacherOnlyFields(
    LoTConfig,
    PULL_FIELDS | {"student", "student_ce", "detach"},
    frozenset({"student_steps", "num_students"}),
    model_steps_multiplier,
)
BUDGETS = ("teacher_steps", "model_steps")


def ignored_by_arm(fields: TeacherOnlyFields, budget: str) -> frozenset[str]:
    return fields.pull | (fields.students if budget == "teacher_steps" else frozenset())


def teacher_only_overrides(fields: TeacherOnlyFields, budget: str) -> dict[str, Any]:
    """What a teacher-only arm sets of the fields it ignores: alpha 0 (no pull: the public code's teacher-only run)
    and the defaults of the others, so that the arms of configs that differ only there are equal (trained once)."""
    defaults = {name: info.get_default(call_default_factory=True) for name, info in fields.config.model_fields.items()}
    return {name: defaults[name] for name in sorted(ignored_by_arm(fields, budget))} | {"alpha": 0.0}


def fixed_arms(cfg: LoTConfig, plan: ArmPlan) -> list[dict[str, Any]]:
    """Teacher-only arms at each budget the spec's `baseline` asks for. `teacher_steps`: the same number of teacher
    steps, one arm. `model_steps`: the teacher-only arm trains (1 + N*K) times as many steps, one arm per N the
    sweep can pick, each recording its N and K."""
    arms: list[dict[str, Any]] = []
    if "teacher_steps" in plan.budgets:
        arms.append({"label": "teacher_only", "arm": "teacher_only", **teacher_only_overrides(FIELDS, "teacher_steps")})
    if "model_steps" in plan.budgets:
        neutral = teacher_only_overrides(FIELDS, "model_steps")
        arms += [
            {
                "label": f"teacher_only-N{n}",
                "arm": "teacher_only",
                **neutral,
                "student_steps": n,
                "budget_multiplier": float(1 + n * cfg.num_students),
            }
            for n in sorted(set(plan.choices.get("student_steps", [cfg.student_steps])))
        ]
    return arms


def arm_budget(params: dict[str, Any]) -> str:
    """The budget a teacher-only arm was trained at, from its recorded `budget_multiplier`."""
    return "model_steps" if float(params.get("budget_multiplier") or 1.0) > 1.0 else "teacher_steps"


def arm_config(params: dict[str, Any], fields: TeacherOnlyFields, budget: str) -> dict[str, Any]:
    """The config a teacher-only arm at `budget` trains with for a trial of `params` (a row's recorded config,
    the defaults filled in): everything but what the arm ignores, its seed and its budget."""
    config = filled(params, fields.config)
    ignored = ignored_by_arm(fields, budget) | {"arm", "budget_multiplier", "seed"}
    return {k: v for k, v in config.items() if k not in ignored}


def stands_for(arm: dict[str, Any], trial: dict[str, Any], fields: TeacherOnlyFields, budget: str) -> bool:
    """Whether a teacher-only arm at `budget` is the one `trial` is compared with. A model-steps arm that did not
    record its N (planned by earlier versions) is matched on its budget, 1 + N*K model steps per teacher step."""
    if budget == "model_steps" and "student_steps" not in arm["params"]:
        legacy = ignored_by_arm(fields, "teacher_steps") | {"arm", "budget_multiplier", "seed"}
        same = {k: v for k, v in filled(arm["params"], fields.config).items() if k not in legacy} == {
            k: v for k, v in filled(trial["params"], fields.config).items() if k not in legacy
        }
        recorded = float(arm["params"].get("budget_multiplier") or 1.0)
        return same and math.isclose(recorded, fields.multiplier(trial["params"]), rel_tol=1e-6)
    return arm_config(arm["params"], fields, budget) == arm_config(trial["params"], fields, budget)


def arms_standing_for(
    trial: dict[str, Any], trials: list[dict[str, Any]], fields: TeacherOnlyFields
) -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """(budget, the teacher-only arms trained at it for `trial`'s config, all arms trained at it) for each budget
    the sweep trained teacher-only arms at."""
    arms = [t for t in trials if t["params"].get("arm") == "teacher_only" and t is not trial]
    out = []
    for budget in [b for b in BUDGETS if any(arm_budget(a["params"]) == b for a in arms)]:
        at_budget = [a for a in arms if arm_budget(a["params"]) == budget]
        out.append((budget, [a for a in at_budget if stands_for(a, trial, fields, budget)], at_budget))
    return out


def lot_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t["params"].get("arm", "lot") == "lot" and t["status"] == "OK"]


def baselines(
    trial: dict[str, Any], trials: list[dict[str, Any]], fields: TeacherOnlyFields = FIELDS
) -> list[tuple[str, dict[str, Any] | None]]:
    """(budget, the finished teacher-only arm that stands for `trial` at that budget, or None) for each budget the
    sweep trained teacher-only arms at: matched on the arm's recorded budget and config (N included for model
    steps), whichever variant planned it."""
    found = []
    for budget, matching, _ in arms_standing_for(trial, trials, fields):
        found.append((budget, next((a for a in matching if a["status"] == "OK"), None)))
    return found


def uncompared(trials: list[dict[str, Any]], fields: TeacherOnlyFields = FIELDS) -> list[str]:
    """A sentence for each LoT trial and budget the sweep ran that has no finished teacher-only arm to compare it
    with, saying why."""
    said = []
    for trial in lot_trials(trials):
        for budget, matching, at_budget in arms_standing_for(trial, trials, fields):
            if any(a["status"] == "OK" for a in matching):
                continue
            head = f"{trial['trial_id']} [{trial['label']}]"
            if matching:
                said.append(f"{head}: its teacher-only arm at {budget} ({matching[0]['label']}) did not finish")
                continue
            nearest = nearest_difference(trial, at_budget, fields, budget)
            said.append(f"{head}: no finished teacher-only arm at {budget} matches it ({nearest})")
    return said


def nearest_difference(
    trial: dict[str, Any], arms: list[dict[str, Any]], fields: TeacherOnlyFields, budget: str
) -> str:
    """How the arm closest to `trial`'s config differs from it, e.g. 'nearest teacher_only-N2: student_steps 2,
    here 3'."""
    wanted = arm_config(trial["params"], fields, budget)
    differences = []
    for arm in arms:
        config = arm_config(arm["params"], fields, budget)
        differences.append((arm["label"], [f"{k} {config[k]}, here {v}" for k, v in wanted.items() if config[k] != v]))
    label, differing = min(differences, key=lambda d: len(d[1]))
    return f"nearest {label}: {'; '.join(differing)}"


def compare(
    trials: list[dict[str, Any]], metric_names: list[str], fields: TeacherOnlyFields = FIELDS
) -> list[dict[str, Any]]:
    """Each LoT trial against its teacher-only arm at each budget the sweep ran (`baselines`), per metric, paired
    by seed. `trials` are sweep rows: {"label", "params", "metrics"} with per-seed `metric@seedN` values; what
    cannot be compared is said by `uncompared`."""
    rows = []
    for trial in lot_trials(trials):
        variant = trial["params"].get("variant", "")
        for budget, baseline in baselines(trial, trials, fields):
            if baseline is None:
                continue
            for metric in metric_names:
                lot_values, base_values = per_seed(trial["metrics"], metric), per_seed(baseline["metrics"], metric)
                if not lot_values or not base_values:
                    continue
                rows.append(
                    {
                        "variant": variant,
                        "trial": trial["trial_id"],
                        "baseline": baseline["trial_id"],
                        "baseline_label": baseline["label"],
                        "budget": budget,
                        "metric": metric,
                        **{f"lot_{k}": v for k, v in summarize(lot_values).items()},
                        **{f"teacher_only_{k}": v for k, v in summarize(base_values).items()},
                        **paired_difference(lot_values, base_values),
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------- losses


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(target/T) || softmax(logits/T)).

    Rows are examples (classification) or tokens (language modelling: logits are flattened to (rows, V)).
    Gradient flows into whichever argument is not detached."""
    target_logits = target_logits.reshape(-1, target_logits.size(-1)).float()
    logits = logits.reshape(-1, logits.size(-1)).float()
    log_target = F.log_softmax(target_logits / temperature, dim=-1)
    log_model = F.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_model, log_target, reduction="batchmean", log_target=True) * temperature**2


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (classification) or per token (language modelling)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


def teacher_loss(
    teacher_logits: torch.Tensor,
    student_logits: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: LoTConfig | MemberTerms,
    task: Callable = task_loss,
    kl: Callable = kl_divergence,
) -> torch.Tensor:
    """CE + alpha * sum_i lambda_i KL(S_i || T); the students' logits are detached unless cfg.detach is off.
    A pack passes its members' terms as columns and its per-member `task` and `kl` (one loss per member)."""
    loss = task(teacher_logits, labels)
    if not student_logits:  # the teacher-only arm
        return loss
    for weight, s_logits in zip(cfg.lambdas, student_logits, strict=True):
        target = s_logits.detach() if cfg.detach else s_logits
        term = kl(target, teacher_logits, cfg.temperature)
        if cfg.symmetric_kl:
            term = term + kl(teacher_logits, target, cfg.temperature)
        loss = loss + cfg.alpha * weight * term
    return loss


def student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: LoTConfig | MemberTerms,
    task: Callable = task_loss,
    kl: Callable = kl_divergence,
) -> torch.Tensor:
    """[CE] + alpha * KL(T || S); the teacher's logits are detached unless cfg.detach is off."""
    target = teacher_logits.detach() if cfg.detach else teacher_logits
    loss = cfg.alpha * kl(target, student_logits, cfg.temperature)
    if cfg.student_ce:
        loss = loss + task(student_logits, labels)
    return loss


# ---------------------------------------------------------------------------------------------- training


def train(config: LoTConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = LoTConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    task_data = TaskData(cfg, [cfg.teacher, cfg.student])
    if task_data.task.regression:
        raise ValueError(f"task {cfg.task}: LoT's KL term needs classes, and this task has a real-valued target")

    teacher = models.build_model(cfg.teacher, task_data.task, models.init_seed(cfg.seed, "teacher"), cfg.bptt)
    teacher = models.use_fast_attention(teacher).to(device).train()  # (LoT never reads attention weights)
    n_students = cfg.num_students if cfg.arm == "lot" else 0
    students = [
        models.use_fast_attention(
            models.build_model(
                cfg.student or cfg.teacher, task_data.task, models.init_seed(cfg.seed, "student", i), cfg.bptt
            )
        )
        .to(device)
        .train()
        for i in range(n_students)
    ]

    if cfg.freeze_embeddings:
        for model in [teacher, *students]:
            models.freeze_word_embeddings(model)

    # Under DDP every worker draws the same global batches and trains on its shard of each.
    teacher, students = distributed.wrap(teacher), [distributed.wrap(s) for s in students]
    steps_per_epoch = cfg.steps_per_epoch or task_data.steps_per_pass()
    epochs = epochs_to_run(cfg)
    teacher_total = steps_per_epoch * epochs
    teacher_opt, teacher_sched = make_optimizer(teacher, cfg, teacher_total)
    student_opts = [make_optimizer(s, cfg, teacher_total * cfg.student_steps) for s in students]

    joint_stream = task_data.stream(cfg.seed)
    student_stream = task_data.stream(cfg.seed + 10_000)  # independent batches for the extra student steps
    # Recurrent states (LSTM) per stream: index 0 is the teacher, 1..K the students.
    joint_state: list = [None] * (1 + n_students)
    extra_state: list = [None] * (1 + n_students)

    teacher_steps = student_steps = 0
    train_seconds = 0.0
    best_val, metrics, first_epoch, best_teacher = None, {}, 1, None
    at_best: dict[str, float] = {}  # test score and step counts at the best validation epoch
    higher_is_better = not task_data.is_lm
    saved = reporter.restore()
    stateful = training_objects(teacher, (teacher_opt, teacher_sched), students, student_opts)
    if saved is not None:  # a restarted trial: continue after the last checkpointed epoch
        restore_into(saved, stateful)
        teacher_steps, student_steps = saved["teacher_steps"], saved["student_steps"]
        train_seconds, best_val, first_epoch = saved["train_seconds"], saved["best_val"], saved["epoch"] + 1
        at_best, metrics, best_teacher = saved["at_best"], saved["metrics"], saved["best_teacher"]
        replay(joint_stream, teacher_steps)  # the streams are deterministic: replay them to where they were
        replay(student_stream, student_steps - teacher_steps if students else 0)
    stopped = saved is not None and cfg.patience is not None and saved["epoch"] - at_best["best_epoch"] >= cfg.patience
    for epoch in range(first_epoch, epochs + 1 if not stopped else first_epoch):  # (restarted after its stop)
        loss_sums = torch.zeros(2, device=device)  # teacher, students: checked for NaN once per epoch
        epoch_start = time.perf_counter()
        for _ in range(steps_per_epoch):
            batch = to_device(distributed.shard(next(joint_stream)), device)
            with autocast(device, cfg.precision):
                t_logits, joint_state[0] = teacher(batch, joint_state[0])
                s_logits = []
                for i, student in enumerate(students):
                    logits, joint_state[i + 1] = student(batch, joint_state[i + 1])
                    s_logits.append(logits)
                loss_t = teacher_loss(t_logits, s_logits, batch["labels"], cfg)
                loss_s = sum(
                    (student_loss(logits, t_logits, batch["labels"], cfg) for logits in s_logits),
                    torch.zeros((), device=device),
                )
            # One backward for all models: with detached targets the losses touch disjoint parameters.
            (loss_t + loss_s).backward()
            update(teacher, teacher_opt, teacher_sched, cfg.clip_grad_norm)
            for student, (opt, sched) in zip(students, student_opts, strict=True):
                update(student, opt, sched, cfg.clip_grad_norm)
            loss_sums += torch.stack([loss_t.detach(), loss_s.detach()])
            teacher_steps += 1
            student_steps += 1 if students else 0

            for _ in range(cfg.student_steps - 1 if students else 0):
                batch = to_device(distributed.shard(next(student_stream)), device)
                with autocast(device, cfg.precision):
                    with torch.no_grad():  # the teacher only provides targets here: no graph
                        t_logits, extra_state[0] = distributed.unwrap(teacher)(batch, extra_state[0])
                    for i, (student, (opt, sched)) in enumerate(zip(students, student_opts, strict=True)):
                        logits, extra_state[i + 1] = student(batch, extra_state[i + 1])
                        loss = student_loss(logits, t_logits, batch["labels"], cfg)
                        loss.backward()
                        update(student, opt, sched, cfg.clip_grad_norm)
                student_steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - epoch_start
        if not torch.isfinite(loss_sums).all():
            raise FloatingPointError(f"loss is not finite in epoch {epoch} (teacher, students: {loss_sums.tolist()})")

        metrics = evaluate_all(
            distributed.unwrap(teacher), [distributed.unwrap(s) for s in students], task_data, device, cfg.precision
        )
        world = distributed.world()[1]
        loss_teacher, loss_student = distributed.all_sum(loss_sums.tolist(), device)
        metrics |= task_data.examples() | {
            "loss/teacher": loss_teacher / world / steps_per_epoch,
            "loss/student": loss_student / world / steps_per_epoch / max(1, n_students),
            "steps/teacher": teacher_steps,
            "steps/student": student_steps,
            "steps/model": teacher_steps + student_steps * n_students,
            "time/teacher_step_s": train_seconds / teacher_steps,
            "time/train_s": train_seconds,
        }
        key = "teacher/val_ppl" if task_data.is_lm else "teacher/val_acc"
        if best_val is None or (metrics[key] > best_val if higher_is_better else metrics[key] < best_val):
            best_val = metrics[key]
            test_key = key.replace("/val_", "/test_")
            at_best = {
                f"{test_key}_at_best_val": metrics[test_key],
                "steps/teacher_at_best_val": teacher_steps,
                "steps/model_at_best_val": metrics["steps/model"],
                "best_epoch": epoch,
            }
            best_teacher = {k: v.detach().cpu().clone() for k, v in distributed.unwrap(teacher).state_dict().items()}
        elif cfg.lr_decay_on_plateau is not None:
            for _, schedule in (teacher_opt, teacher_sched), *student_opts:
                divide_learning_rate(schedule, cfg.lr_decay_on_plateau)
        metrics[key.replace("teacher/", "teacher/best_")] = best_val
        metrics["lr/teacher"] = teacher_sched.get_last_lr()[0]
        metrics |= at_best
        last = epoch == epochs or (cfg.patience is not None and epoch - at_best["best_epoch"] >= cfg.patience)
        if last and cfg.imitation_steps is not None:
            metrics |= imitation_probe(best_teacher, cfg, task_data, device)
        checkpoint = None
        if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == epochs):
            counters = {
                "epoch": epoch,
                "teacher_steps": teacher_steps,
                "student_steps": student_steps,
                "train_seconds": train_seconds,
                "best_val": best_val,
                "at_best": at_best,
                "metrics": metrics,
                "best_teacher": best_teacher,
            }
            checkpoint = counters | state_of(stateful)
        if saved is not None:
            metrics["trial/resumed_from_epoch"] = saved["epoch"]
        reporter.report(metrics, epoch, checkpoint=checkpoint)
        if last:
            break
    if distributed.world()[0] == 0 and best_teacher is not None:  # the best-validation teacher, for later stages
        reporter.log_teacher(best_teacher, teacher_config(cfg))
    return metrics


def imitation_probe(teacher_state: dict, cfg: LoTConfig, task_data: TaskData, device) -> dict[str, float]:
    """How easily a fresh student imitates a trained teacher: a newly initialised model of the student
    architecture trained for `imitation_steps` steps on KL(T || S) at temperature 1 over training inputs (no
    labels, the config's optimizer and batch size), then scored on the held-out splits: KL(T || S) per example
    (per token for a language model) and, for classes, how often its top class is the teacher's. Every worker of
    a distributed trial runs the same probe on whole batches."""
    task = task_data.task
    teacher = models.build_model(cfg.teacher, task, models.init_seed(cfg.seed, "teacher"), cfg.bptt)
    teacher.load_state_dict(teacher_state)
    teacher = models.use_fast_attention(teacher).to(device).eval().requires_grad_(False)
    architecture = cfg.student or cfg.teacher
    imitator = models.build_model(architecture, task, models.init_seed(cfg.seed, "imitator"), cfg.bptt)
    imitator = models.use_fast_attention(imitator).to(device).train()
    if cfg.freeze_embeddings:
        models.freeze_word_embeddings(imitator)
    opt, schedule = make_optimizer(imitator, cfg, cfg.imitation_steps)
    stream, states = task_data.stream(cfg.seed + 20_000), [None, None]
    for _ in range(cfg.imitation_steps):
        batch = to_device(next(stream), device)
        with autocast(device, cfg.precision):
            with torch.no_grad():
                target, states[0] = teacher(batch, states[0])
            logits, states[1] = imitator(batch, states[1])
            loss = kl_divergence(target, logits, 1.0)
        if not torch.isfinite(loss):
            raise FloatingPointError("the imitation probe's loss is not finite")
        loss.backward()
        update(imitator, opt, schedule, cfg.clip_grad_norm)
    imitator.eval()
    out = {}
    for split, short in (("validation", "val"), ("test", "test")):
        # totals stay on the device, read once at the end: no host sync per batch
        totals, rows, states = torch.zeros(2, dtype=torch.float64, device=device), 0, [None, None]
        with torch.no_grad():
            for batch in task_data.eval_stream(split):
                batch = to_device(batch, device)
                with autocast(device, cfg.precision):
                    target, states[0] = teacher(batch, states[0])
                    logits, states[1] = imitator(batch, states[1])
                n = target.numel() // target.size(-1)
                same = (target.argmax(-1) == logits.argmax(-1)).sum()
                totals += torch.stack([kl_divergence(target, logits, 1.0) * n, same.to(torch.float64)])
                rows += n
        kl_sum, same_sum = totals.tolist()
        out[f"imitation/{short}_kl"] = kl_sum / rows
        if not task_data.is_lm:
            out[f"imitation/{short}_agreement"] = same_sum / rows
    return out


def epochs_to_run(cfg: LoTConfig) -> int:
    """Epochs of `steps_per_epoch` teacher steps: `epochs`, times `budget_multiplier` for a longer budget."""
    return max(1, math.floor(cfg.epochs * cfg.budget_multiplier + 0.5))


def divide_learning_rate(schedule: torch.optim.lr_scheduler.LambdaLR, factor: float) -> None:
    """Anneal a schedule's base learning rates (and so every later step's) by `factor`; saved with its state."""
    schedule.base_lrs = [lr / factor for lr in schedule.base_lrs]
    for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr(), strict=True):
        group["lr"] = lr / factor
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]


def teacher_config(cfg: LoTConfig) -> dict[str, Any]:
    """The teacher config a saved LoT teacher is loaded with (jobs/teacher.py rebuilds the model from it)."""
    shared = {k: v for k, v in cfg.model_dump().items() if k in TeacherConfig.model_fields and k != "patience"}
    return TeacherConfig.model_validate(shared | {"model": cfg.teacher}).model_dump()


def training_objects(teacher, teacher_opt, students, student_opts) -> dict[str, Any]:
    """Every model, optimizer and schedule a checkpoint saves and a restarted trial loads, by key."""
    objects = {"teacher": distributed.unwrap(teacher), "teacher_opt": teacher_opt[0], "teacher_sched": teacher_opt[1]}
    for i, (student, (opt, sched)) in enumerate(zip(students, student_opts, strict=True)):
        objects |= {f"student{i}": distributed.unwrap(student), f"student{i}_opt": opt, f"student{i}_sched": sched}
    return objects


def evaluate_all(teacher, students, task_data: TaskData, device, precision) -> dict[str, float]:
    """Teacher and student quality on validation and test; students' agreement with the teacher."""
    metric = "ppl" if task_data.is_lm else "acc"
    out: dict[str, float] = {}
    for split, short in (("validation", "val"), ("test", "test")):
        value, t_pred = evaluate(teacher, task_data.eval_stream(split), device, precision)
        out[f"teacher/{short}_{metric}"] = value
        values, agreements = [], []
        for i, student in enumerate(students):
            s_value, s_pred = evaluate(student, task_data.eval_stream(split), device, precision)
            values.append(s_value)
            if len(students) > 1:
                out[f"student{i}/{short}_{metric}"] = s_value
            if len(s_pred):
                same, total = distributed.all_sum([(s_pred == t_pred).sum().item(), len(s_pred)], device)
                agreements.append(same / total)
        if values:
            out[f"student/{short}_{metric}"] = sum(values) / len(values)
        if agreements:
            out[f"agreement/{short}"] = sum(agreements) / len(agreements)
    return out


# ---------------------------------------------------------------------------------------------- packed training

# What the members of one pack may differ in: every other field shapes the computation (model, N, K, batch size,
# steps) and must be equal across the pack.
PACK_VARIES = frozenset(
    {"seed", "lr", "momentum", "weight_decay", "clip_grad_norm", "alpha", "temperature", "student_weights"}
    | {"patience", "lr_decay_on_plateau"}
)


def check_pack(cfg: LoTConfig) -> None:
    """What a packed LoT trial cannot train, named by its field."""
    if tasks.task_kind(cfg.task) == "lm":
        raise ValueError(f"task: {cfg.task} is language modelling, which does not pack yet: set resources.pack to 1")
    if cfg.imitation_steps is not None:
        raise ValueError("imitation_steps: a packed LoT trial has no imitation probe yet: set resources.pack to 1")


def member_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(P,) `kl_divergence` of each member at its own temperature (P,): T^2 * KL(softmax(target/T) ||
    softmax(logits/T)), summed over classes and averaged over the member's rows."""
    t = temperature.view(-1, 1, 1)
    log_target = F.log_softmax(target_logits.float() / t, dim=-1)
    log_model = F.log_softmax(logits.float() / t, dim=-1)
    kl = (log_target.exp() * (log_target - log_model)).sum((1, 2)) / logits.shape[1]
    return kl * temperature**2


@dataclass(frozen=True)
class MemberTerms:
    """The LoT term's per-member hyperparameters as columns (P,) and the structure all members share."""

    alpha: torch.Tensor
    temperature: torch.Tensor
    lambdas: torch.Tensor  # (K, P)
    symmetric_kl: bool
    detach: bool
    student_ce: bool

    @classmethod
    def of(cls, cfgs: list[LoTConfig], device: torch.device) -> MemberTerms:
        lead = cfgs[0]
        return cls(
            member_column([c.alpha for c in cfgs], device),
            member_column([c.temperature for c in cfgs], device),
            torch.tensor([c.lambdas for c in cfgs], dtype=torch.float32, device=device).T,
            lead.symmetric_kl,
            lead.detach,
            lead.student_ce,
        )

    def at(self, positions: torch.Tensor) -> MemberTerms:
        """The columns of the members at `positions` (the original indices of those still training)."""
        index = positions.to(self.alpha.device)
        return MemberTerms(
            self.alpha[index],
            self.temperature[index],
            self.lambdas[:, index],
            self.symmetric_kl,
            self.detach,
            self.student_ce,
        )


def pack_teacher_loss(
    teacher_logits: torch.Tensor, student_logits: list[torch.Tensor], labels: torch.Tensor, terms: MemberTerms
) -> torch.Tensor:
    """(P,) `teacher_loss` of each member."""
    return teacher_loss(teacher_logits, student_logits, labels, terms, member_cross_entropy, member_kl)


def pack_student_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, terms: MemberTerms
) -> torch.Tensor:
    """(P,) `student_loss` of each member."""
    return student_loss(student_logits, teacher_logits, labels, terms, member_cross_entropy, member_kl)


@dataclass
class MemberRecord:
    """What one member carries from epoch to epoch: its best validation score and what was measured there."""

    best_val: float | None = None
    at_best: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    best_teacher: dict[str, torch.Tensor] | None = None


def evaluate_pack_all(teacher: StackedModel, students: list[StackedModel], task_data: TaskData, device, precision):
    """`evaluate_all` for each member of a pack: a list of metric dicts, one per member still training."""
    out: list[dict[str, float]] = [{} for _ in range(teacher.size)]
    for split, short in (("validation", "val"), ("test", "test")):
        accuracy, t_pred = evaluate_pack(teacher, task_data.eval_stream(split), device, precision)
        scores = [evaluate_pack(s, task_data.eval_stream(split), device, precision) for s in students]
        for m, metrics in enumerate(out):
            metrics[f"teacher/{short}_acc"] = accuracy[m]
            if not scores:
                continue
            if len(students) > 1:
                metrics |= {f"student{i}/{short}_acc": s_acc[m] for i, (s_acc, _) in enumerate(scores)}
            metrics[f"student/{short}_acc"] = sum(s_acc[m] for s_acc, _ in scores) / len(scores)
            agreements = [(s_pred[m] == t_pred[m]).sum().item() / t_pred.shape[1] for _, s_pred in scores]
            metrics[f"agreement/{short}"] = sum(agreements) / len(agreements)
    return out


def train_pack(configs: list[LoTConfig | dict], pack: PackReporter | None = None) -> dict[int, dict[str, float]]:
    """`train` for P configs at once (module docstring of packing.py): each member's reports equal its unpacked
    twin's. Returns each member's final metrics, by member index, for the members that did not fail."""
    cfgs = [LoTConfig.model_validate(c) for c in configs]
    pack = pack or PackReporter([Reporter() for _ in cfgs])
    check_members_share(cfgs, PACK_VARIES)
    lead = cfgs[0]
    check_pack(lead)
    device = pick_device(lead.device)
    task_data = TaskData(lead, [lead.teacher, lead.student])
    if task_data.task.regression or task_data.is_lm:
        raise ValueError(f"task {lead.task}: packed LoT trains classifiers")

    def built(name: str, role: str, index: int = 0) -> list[torch.nn.Module]:
        members = [models.build_model(name, task_data.task, models.init_seed(c.seed, role, index)) for c in cfgs]
        for model in members:
            if lead.freeze_embeddings:
                models.freeze_word_embeddings(model)
        return [models.use_fast_attention(model).to(device).train() for model in members]

    teacher = StackedModel(built(lead.teacher, "teacher"))
    n_students = lead.num_students if lead.arm == "lot" else 0
    students = [StackedModel(built(lead.student or lead.teacher, "student", i)) for i in range(n_students)]
    steps_per_epoch = lead.steps_per_epoch or task_data.steps_per_pass()
    epochs = epochs_to_run(lead)
    teacher_total = steps_per_epoch * epochs

    def optimizer(model: StackedModel, total_steps: int) -> StackedOptimizer:
        return StackedOptimizer(
            model.trainable(),
            lead.optimizer,
            lr=member_column([c.lr for c in cfgs], device, torch.float64),
            weight_decay=member_column([c.weight_decay for c in cfgs], device, torch.float64),
            momentum=member_column([c.momentum for c in cfgs], device, torch.float64),
            clip=member_column([c.clip_grad_norm for c in cfgs], device),
            nesterov=lead.nesterov,
            lr_factor=schedule_factor(lead.schedule, total_steps),
        )

    teacher_opt = optimizer(teacher, teacher_total)
    student_opts = [optimizer(s, teacher_total * lead.student_steps) for s in students]
    all_terms = MemberTerms.of(cfgs, device)
    joint_streams = {c.seed: task_data.stream(c.seed) for c in cfgs}
    student_streams = {c.seed: task_data.stream(c.seed + 10_000) for c in cfgs}

    active = list(range(len(cfgs)))  # original indices of the members still training, in stack order
    records = [MemberRecord() for _ in cfgs]
    teacher_steps = student_steps = 0
    train_seconds, first_epoch = 0.0, 1
    saved = pack.restore()
    if saved is not None:
        active = saved["active"]
        leave([teacher, *students], [teacher_opt, *student_opts], active)  # (a fresh stack holds every member)
        restore_stacks(saved["models"], saved["optimizers"], [teacher, *students], [teacher_opt, *student_opts])
        records = [MemberRecord(**record) for record in saved["records"]]
        teacher_steps, student_steps = saved["teacher_steps"], saved["student_steps"]
        train_seconds, first_epoch = saved["train_seconds"], saved["epoch"] + 1
        for seed in {cfgs[m].seed for m in active}:
            replay(joint_streams[seed], teacher_steps)
            replay(student_streams[seed], student_steps - teacher_steps if students else 0)

    def next_batch(streams) -> dict[str, torch.Tensor]:
        drawn = {seed: next(streams[seed]) for seed in dict.fromkeys(cfgs[m].seed for m in active)}
        return stack_batches([drawn[cfgs[m].seed] for m in active], device)

    for epoch in range(first_epoch, epochs + 1):
        if not active:
            break
        terms = all_terms.at(torch.tensor(active))
        loss_sums = torch.zeros(len(active), 2, device=device)  # teacher, students per member: checked for NaN
        epoch_start = time.perf_counter()
        for _ in range(steps_per_epoch):
            batch = next_batch(joint_streams)
            with autocast(device, lead.precision):
                t_logits = teacher(batch)
                s_logits = [student(batch) for student in students]
                loss_t = pack_teacher_loss(t_logits, s_logits, batch["labels"], terms)
                zero = torch.zeros_like(loss_t)
                loss_s = sum((pack_student_loss(s, t_logits, batch["labels"], terms) for s in s_logits), zero)
            (loss_t + loss_s).sum().backward()  # members' parameters are disjoint slices: one backward for all
            for opt in (teacher_opt, *student_opts):
                opt.step()
                opt.zero_grad()
            loss_sums += torch.stack([loss_t.detach(), loss_s.detach()], dim=1)
            teacher_steps += 1
            student_steps += 1 if students else 0
            for _ in range(lead.student_steps - 1 if students else 0):
                batch = next_batch(student_streams)
                with autocast(device, lead.precision):
                    with torch.no_grad():
                        t_logits = teacher(batch)
                    for student, opt in zip(students, student_opts, strict=True):
                        pack_student_loss(student(batch), t_logits, batch["labels"], terms).sum().backward()
                        opt.step()
                        opt.zero_grad()
                student_steps += 1
        synchronize(device)
        train_seconds += time.perf_counter() - epoch_start

        finite = torch.isfinite(loss_sums).all(dim=1).tolist()
        for position, member in enumerate(active):
            if not finite[position]:
                sums = loss_sums[position].tolist()
                error = FloatingPointError(f"loss is not finite in epoch {epoch} (teacher, students: {sums})")
                pack.fail(member, error)
        going_on = [p for p, ok in enumerate(finite) if ok]
        if len(going_on) < len(active):
            leave([teacher, *students], [teacher_opt, *student_opts], going_on)
            active, loss_sums = [active[p] for p in going_on], loss_sums[going_on]
            if not active:
                break

        evaluated = evaluate_pack_all(teacher, students, task_data, device, lead.precision)
        plateaued = []
        results = {}
        for position, member in enumerate(active):
            cfg, record = cfgs[member], records[member]
            metrics = evaluated[position] | task_data.examples()
            metrics |= {
                "loss/teacher": loss_sums[position, 0].item() / steps_per_epoch,
                "loss/student": loss_sums[position, 1].item() / steps_per_epoch / max(1, n_students),
                "steps/teacher": teacher_steps,
                "steps/student": student_steps,
                "steps/model": teacher_steps + student_steps * n_students,
                "time/teacher_step_s": train_seconds / teacher_steps,
                "time/train_s": train_seconds,
            }
            if record.best_val is None or metrics["teacher/val_acc"] > record.best_val:
                record.best_val = metrics["teacher/val_acc"]
                record.at_best = {
                    "teacher/test_acc_at_best_val": metrics["teacher/test_acc"],
                    "steps/teacher_at_best_val": teacher_steps,
                    "steps/model_at_best_val": metrics["steps/model"],
                    "best_epoch": epoch,
                }
                record.best_teacher = teacher.member_state(position)
                plateaued.append(False)
            else:
                plateaued.append(cfg.lr_decay_on_plateau is not None)
            metrics["teacher/best_val_acc"] = record.best_val
            metrics |= record.at_best
            if saved is not None:
                metrics["trial/resumed_from_epoch"] = saved["epoch"]
            record.metrics = results[member] = metrics
        if any(plateaued):
            mask = torch.tensor(plateaued, device=device)
            factors = member_column([cfgs[m].lr_decay_on_plateau or 1.0 for m in active], device, torch.float64)
            for opt in (teacher_opt, *student_opts):
                opt.divide_learning_rate(mask, factors)
        for position, lr in enumerate(teacher_opt.current_lr().tolist()):
            results[active[position]]["lr/teacher"] = lr

        # who leaves now: stopped early (no teacher saved, as a stopped trial saves none) or out of patience
        stopped = pack.early_stops(epoch, results)
        patience_over = {m for m in active if patience_over_for(cfgs[m], records[m], epoch)} - stopped
        for member in patience_over:
            pack.members[member].log_teacher(records[member].best_teacher, teacher_config(cfgs[member]))
        going_on = [p for p, m in enumerate(active) if m not in stopped | patience_over]
        if len(going_on) < len(active):
            leave([teacher, *students], [teacher_opt, *student_opts], going_on)
            active = [active[p] for p in going_on]
        checkpoint = None
        if any(cfgs[m].checkpoint_every for m in results):
            checkpoint = pack_checkpoint(epoch, active, records, teacher, students, teacher_opt, student_opts)
            checkpoint |= {"teacher_steps": teacher_steps, "student_steps": student_steps}
            checkpoint["train_seconds"] = train_seconds
        pack.report(epoch, results, checkpoint=checkpoint)
    for member in active:  # trained every epoch (also when restarted from the last epoch's checkpoint)
        if records[member].best_teacher is not None:
            pack.members[member].log_teacher(records[member].best_teacher, teacher_config(cfgs[member]))
    return {m: record.metrics for m, record in enumerate(records) if record.metrics and m not in pack.failed}


def patience_over_for(cfg: LoTConfig, record: MemberRecord, epoch: int) -> bool:
    return cfg.patience is not None and epoch - record.at_best["best_epoch"] >= cfg.patience


def pack_checkpoint(epoch, active, records, teacher, students, teacher_opt, student_opts) -> dict[str, Any]:
    """The pack's state at an epoch boundary: which members train, their records, every stacked tensor."""
    return {
        "epoch": epoch,
        "active": list(active),
        "records": [dataclasses.asdict(record) for record in records],
        "models": [{"params": detached(m.params), "buffers": detached(m.buffers)} for m in [teacher, *students]],
        "optimizers": [opt.state_dict() for opt in [teacher_opt, *student_opts]],
    }


# LoT on digits with an 8-channel CNN, a few steps an epoch: the small config the tests, the benchmarks and the
# device check start from (each sets its own steps, evaluation size and device on top).
DIGITS_QUICK: dict[str, Any] = {
    "task": "digits",
    "teacher": "cnn:8",
    "epochs": 2,
    "steps_per_epoch": 4,
    "batch_size": 16,
    "max_eval_examples": 64,
    "optimizer": "sgd",
    "lr": 0.05,
    "student_steps": 2,
}

JOB = JobSpec(
    config=LoTConfig,
    train=train,
    metrics=metrics,
    objective=("teacher/best_val_acc", "max"),
    scores=(
        "teacher/test_acc",
        "teacher/test_ppl",
        "teacher/test_acc_at_best_val",
        "teacher/test_ppl_at_best_val",
        "student/test_acc",
        "steps/teacher_at_best_val",
        "steps/model_at_best_val",
    ),
    fixed_arms=fixed_arms,
    baselines=baselines,
    compare=compare,
    uncompared=uncompared,
    default_arm="lot",
    train_pack=train_pack,
    pack_varies=PACK_VARIES,
    check_pack=check_pack,
    saves_teacher=True,  # the best-validation teacher, as model.pt + config.json of the trial's run
    saved_teacher_scores=("teacher/test_acc_at_best_val", "teacher/test_ppl_at_best_val"),
)
