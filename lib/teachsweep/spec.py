"""Sweep specs: safe YAML, validated completely before anything is created.

Every error is one line that names the file and the field, e.g.
    sweeps/x.yaml: space.alpha.low: loguniform needs low > 0
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from teachsweep.jobs import JOBS
from teachsweep.layout import DEFAULT_RESULTS
from teachsweep.validation import CHECK_FILES

LARGEST_INT = 2**32  # no count, size or seed a spec can sensibly hold reaches it (Optuna and numpy fail beyond)


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(Strict):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False  # int only: log-spaced integers
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Param:
        if self.type == "categorical":
            if not self.values:
                raise ValueError("categorical needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low > self.high or (self.type != "int" and self.low == self.high):
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ValueError(f"{self.type} needs low > 0 (got {self.low})")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"not a finite number (low {self.low}, high {self.high})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs integer low and high")
        if self.type == "int" and max(abs(self.low), abs(self.high)) > LARGEST_INT:
            raise ValueError(f"int bounds beyond any sensible size (at most {LARGEST_INT:,})")
        return self

    def corner_values(self) -> list[Any]:
        """Values a job config must accept for this parameter to be searchable."""
        if self.type == "categorical":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


class Sampler(Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, lt=2**32)  # numpy seeds Optuna's samplers: 0 <= seed < 2**32


class Scheduler(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the job's epochs


class Baseline(Strict):
    """An automatic teacher-only arm for LoT sweeps, at a matched budget."""

    budget: Literal["teacher_steps", "model_steps"] | list[Literal["teacher_steps", "model_steps"]] = "teacher_steps"

    @property
    def budgets(self) -> list[str]:
        """Each matched budget to run a teacher-only arm at (one or both)."""
        return list(dict.fromkeys([self.budget] if isinstance(self.budget, str) else self.budget))


class Endpoint(Strict):
    """One registered comparison of a study: a metric, LoT minus its teacher-only arm at a `budget` (LoT's jobs),
    or a variant minus the job's reference arm (`variant`; SMaT's students against the unexplained ones) or minus
    another variant (`versus`: SMaT's students against the static-attention ones), paired by seed; or, for students
    of every teacher of an earlier sweep (`sweep:<name>/each`), the students of the teachers of arm `teacher` minus
    those of the earlier sweep's baseline teachers (LoT's teacher-only), paired by teacher seed."""

    metric: str
    budget: Literal["teacher_steps", "model_steps"] | None = None
    variant: str | None = None  # LoT: whose LoT trials (default: every variant's); else the label compared
    versus: str | None = None  # the variant it is compared with (default: the job's reference arm)
    teacher: str | None = Field(None, min_length=1)  # the teacher sweep's arm (its label) whose students are compared

    def describe(self) -> str:
        where = f" of {self.variant}" if self.variant else ""
        taught = f" taught by {self.teacher}" if self.teacher else ""
        return f"{self.metric}{where}{taught}" + (f" at {self.budget.replace('_', ' ')}" if self.budget else "")


class Study(Strict):
    """A registered study: its primary endpoint and secondary ones, fixed before it runs (part of the fingerprint:
    a resumed study cannot change them), and the seeds a claim needs."""

    primary: Endpoint
    secondary: list[Endpoint] = Field(default_factory=list)
    min_seeds: int = Field(8, ge=2)

    def named(self) -> list[tuple[str, Endpoint]]:
        """Each endpoint with where the spec gives it: primary, secondary.0, secondary.1, ..."""
        return [("primary", self.primary)] + [(f"secondary.{i}", e) for i, e in enumerate(self.secondary)]

    @property
    def endpoints(self) -> list[Endpoint]:
        return [self.primary, *self.secondary]

    @property
    def by_teacher_seed(self) -> bool:
        """Every endpoint compares students by their teacher's arm: the teachers' seeds are the ones that pair."""
        return all(e.teacher is not None for e in self.endpoints)


class Resources(Strict):
    cpus: float = Field(1.0, gt=0)  # per worker
    gpus: float = Field(0.0, ge=0)  # per worker
    workers: int = Field(1, ge=1)
    gpu_type: str | None = None  # Ray's accelerator type, e.g. A100, H100, A10G (nodes advertise it)
    pack: int = Field(1, ge=1, le=4096)  # configurations one trial trains at once (packing.py)

    @model_validator(mode="after")
    def _gpu_type_needs_gpus(self) -> Resources:
        if self.gpu_type and not self.gpus:
            raise ValueError("gpu_type needs gpus > 0")
        if self.gpus > 1:
            raise ValueError(
                f"gpus: {self.gpus:g} per worker, but a worker drives one GPU; for several GPUs set "
                "workers (one per GPU) and gpus: 1"
            )
        if self.workers > 1 and 0 < self.gpus < 1:
            raise ValueError(
                f"gpus: {self.gpus:g} with {self.workers} workers would put several NCCL ranks on one "
                "GPU, which NCCL refuses; use gpus: 1 per worker"
            )
        return self

    def accelerator(self) -> dict[str, float]:
        """The custom resource that pins a worker to nodes with this GPU type (a token amount of it)."""
        return {f"accelerator_type:{self.gpu_type}": 0.001} if self.gpu_type else {}


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SweepSpec(Strict):
    name: str
    job: str
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)  # a grid of named config overlays
    objectives: list[Objective] = Field(default_factory=list)
    num_samples: int = Field(8, ge=1, le=1_000_000)
    max_concurrent_trials: int | None = Field(None, ge=1)
    sampler: Sampler = Field(default_factory=Sampler)
    scheduler: Scheduler | None = None
    # torch, numpy and gymnasium all take them: 0 <= seed < 2**32 is what every one of them accepts
    seeds: list[Annotated[int, Field(ge=0, lt=2**32, strict=True)]] = Field(default_factory=lambda: [0], min_length=1)
    baseline: Baseline | None = None
    resources: Resources = Field(default_factory=Resources)
    pack: int | None = Field(None, ge=1, le=4096)  # the same as resources.pack, at the top level
    study: Study | None = None  # a registered study: primary and secondary endpoints
    max_failures: int = Field(0, ge=0)
    tracking_uri: str | None = None  # default: sqlite file in the results directory ($MLFLOW_TRACKING_URI wins)
    experiment: str | None = None  # MLflow experiment; default: the sweep name (a pipeline's stages: the pipeline's)
    pipeline: str | None = None  # set by a pipeline on its stages (pipeline.py)
    stage: int | None = None
    results_dir: str = DEFAULT_RESULTS

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("use letters, digits, '_', '-' and '.' (it names directories and studies)")
        return value

    @field_validator("results_dir")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if "\0" in value or not value.strip():
            raise ValueError("not a usable directory path (empty, or a NUL byte)")
        return value

    @field_validator("job")
    @classmethod
    def _known_job(cls, value: str) -> str:
        if value not in JOBS:
            raise ValueError(f"unknown job '{value}' (known: {', '.join(sorted(JOBS))})")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> SweepSpec:
        if not self.space and not self.variants:
            raise ValueError("empty search space: give 'space' (searched) or 'variants' (a fixed grid)")
        if self.space and self.variants:
            raise ValueError("give either 'space' (Optuna search) or 'variants' (a fixed grid), not both")
        if self.scheduler is not None and len(self.seeds) > 1:
            raise ValueError("scheduler: early stopping needs one seed per trial (seeds run inside a trial)")
        for where, keys in [("config", self.config), ("space", self.space)] + [
            (f"variants.{n}", v) for n, v in self.variants.items()
        ]:
            if "seed" in keys:
                raise ValueError(f"{where}.seed: seeds are set by the top-level 'seeds' list")
        if self.resources.workers > 1 and JOBS[self.job].single_process:
            raise ValueError(f"resources.workers: job '{self.job}' runs in one process (no DDP workers)")
        if self.resources.workers > 1 and len(self.seeds) > 1 and self.space:
            raise ValueError("resources.workers > 1 (DDP) runs one seed per trial: give seeds to a grid, not a search")
        self._one_pack_size()
        self._registered_study()
        if self.baseline is not None and not JOBS[self.job].has_fixed_arms:
            raise ValueError(f"baseline: job '{self.job}' has no baseline arms (the teacher-only arm is LoT's)")
        if not self.objectives:
            metric, mode = JOBS[self.job].objective
            self.objectives = [Objective(metric=metric, mode=mode)]
        return self

    def _one_pack_size(self) -> None:
        if self.pack is not None:
            if "pack" in self.resources.model_fields_set and self.resources.pack != self.pack:
                raise ValueError(f"pack: {self.pack} here and {self.resources.pack} under resources: give one")
            self.resources.pack = self.pack
        if self.resources.pack == 1:
            return
        if JOBS[self.job].spec.train_pack is None:
            raise ValueError(f"resources.pack: job '{self.job}' does not pack trials (one configuration per trial)")
        if self.resources.workers > 1:
            raise ValueError("resources.pack: a pack trains in one process; it cannot span workers (workers: 1)")
        if self.space and len(self.seeds) > 1:
            raise ValueError("resources.pack: a packed search runs one seed per trial; give seeds to a grid")

    def _registered_study(self) -> None:
        if self.study is None:
            return
        if self.space:
            raise ValueError("study: a study compares the arms of a grid (variants and seeds), not a search")
        if len(self.seeds) < self.study.min_seeds and not self.study.by_teacher_seed:  # else its teachers' seeds count
            raise ValueError(
                f"seeds: a study's claims need at least {self.study.min_seeds} seeds (got {len(self.seeds)}); "
                "a pilot sets study.min_seeds lower"
            )
        budgets = self.baseline.budgets if self.baseline else []
        for where, endpoint in self.study.named():
            job = JOBS[self.job]
            if endpoint.teacher is not None:
                if not job.teacher_fields:
                    raise ValueError(f"study.{where}.teacher: job '{self.job}' takes no teacher")
                for field, given in (("budget", endpoint.budget), ("versus", endpoint.versus)):
                    if given is not None:
                        raise ValueError(
                            f"study.{where}.{field}: an endpoint by teacher arm compares the students of two teacher "
                            f"arms; give no {field}"
                        )
                if endpoint.metric not in job.scores:
                    raise ValueError(
                        f"study.{where}.metric: an endpoint by teacher arm compares the students' held-out scores "
                        f"({', '.join(job.scores)}), not {endpoint.metric!r}"
                    )
                overlays = [self.variants[endpoint.variant]] if endpoint.variant in self.variants else []
                overlays = overlays or list(self.variants.values()) or [{}]
                given = [o.get(f, self.config.get(f)) for o in overlays for f in job.teacher_fields]
                if not any(isinstance(v, str) and v.startswith("sweep:") and v.endswith("/each") for v in given):
                    raise ValueError(
                        f"study.{where}.teacher: its students take no `sweep:<name>/each` teachers to pair by arm"
                    )
                if endpoint.variant is not None and endpoint.variant not in self.variants:
                    raise ValueError(
                        f"study.{where}.variant: no variant named {endpoint.variant!r} "
                        f"(variants: {', '.join(self.variants) or 'none'})"
                    )
                continue
            if endpoint.budget is not None and endpoint.budget not in budgets:
                raise ValueError(
                    f"study.{where}.budget: {endpoint.budget}, but the baseline runs no teacher-only arm at it "
                    f"(baseline budgets: {', '.join(budgets) or 'none'})"
                )
            if endpoint.versus is not None and (endpoint.budget is not None or endpoint.variant is None):
                raise ValueError(
                    f"study.{where}.versus: compares one variant with another: give `variant` and no `budget`"
                )
            if endpoint.versus is not None and job.default_arm is not None:
                raise ValueError(
                    f"study.{where}.versus: job '{self.job}' compares its arms at a budget (give `budget`); "
                    "`versus` compares the variants of jobs whose variants are their arms (scaffold, explain)"
                )
            if endpoint.versus is not None and endpoint.versus == endpoint.variant:
                raise ValueError(f"study.{where}.versus: {endpoint.versus!r} is the variant it would be compared with")
            if endpoint.budget is None and endpoint.versus is None and job.reference_arm is None:
                raise ValueError(
                    f"study.{where}.budget: job '{self.job}' has no reference arm to compare a variant with; give "
                    "the budget its LoT trials are compared with their teacher-only arm at"
                )
            for field, name in (("versus", endpoint.versus), ("variant", endpoint.variant)):
                if name is not None and name not in self.variants:
                    raise ValueError(
                        f"study.{where}.{field}: no variant named {name!r} "
                        f"(variants: {', '.join(self.variants) or 'none'})"
                    )
            if endpoint.budget is None and endpoint.versus is None and endpoint.variant == job.reference_arm:
                raise ValueError(f"study.{where}.variant: {endpoint.variant!r} is the arm the others are compared with")

    @property
    def endpoint_metrics(self) -> list[str]:
        """The metrics a registered study's endpoints compare (compared beside the objectives and scores)."""
        if self.study is None:
            return []
        return list(dict.fromkeys(e.metric for e in self.study.endpoints))

    @property
    def compares_teachers(self) -> bool:
        """Whether a registered endpoint compares students by the arm of their teacher (read from the teacher
        effect, teacher_effect.py)."""
        return self.study is not None and any(e.teacher for e in self.study.endpoints)

    @property
    def endpoint_references(self) -> list[str]:
        """The variants a registered study compares others with, beside the job's reference arm."""
        if self.study is None:
            return []
        endpoints = self.study.endpoints
        return list(dict.fromkeys(e.versus for e in endpoints if e.versus is not None))

    @property
    def packed(self) -> bool:
        return self.resources.pack > 1

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def mode_names(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when a sweep is resumed."""
        keep = ("job", "config", "space", "variants", "objectives", "sampler", "scheduler", "seeds", "baseline")
        # packs change what a Tune trial is: a resume cannot repack (named only when packed, so the fingerprints
        # of unpacked sweeps stay as they were)
        packing = {"pack": self.resources.pack} if self.packed else {}
        # a search's size: Tune restores the number of trials it planned, so a changed one would be ignored
        samples = {"num_samples": self.num_samples} if self.space else {}
        # a study's endpoints as given (fields left at their defaults out: a field added later keeps old ones equal)
        study = {"study": json.loads(self.study.model_dump_json(exclude_defaults=True))} if self.study else {}
        return json.loads(self.model_dump_json(include=set(keep))) | packing | samples | study

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def one_line(error: ValidationError, prefix: str = "") -> str:
    first = error.errors()[0]
    loc = prefix + _location(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if first["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    field, sep, rest = msg.partition(": ")
    names_a_field = all(part.isidentifier() or part.isdigit() for part in field.split("."))
    if not first["loc"] and sep and names_a_field:  # a whole-config check that names its field (or dotted path)
        return f"{prefix}{field}: {rest}"
    if first["type"] in (
        "int_type",
        "float_type",
        "string_type",
        "bool_type",
        "list_type",
        "dict_type",
        "model_type",
        "int_parsing",
        "float_parsing",
        "bool_parsing",
        "literal_error",
    ):
        msg += f" (got {first.get('input')!r})"
    return f"{loc}: {msg}"


def validate_job_config(spec: SweepSpec, where: str, check_files: bool = True) -> None:
    """The fixed config, every variant, and every corner of the search space must be a valid job config; with
    `check_files`, the data files they name must exist (not when a finished sweep is read back)."""
    job = JOBS[spec.job]
    fields = job.config_class.model_fields
    context = CHECK_FILES if check_files else None
    for key in spec.space:
        if key not in fields:
            raise SpecError(f"{where}space.{key}: not a parameter of job '{spec.job}'")
    overlays = [("config", spec.config)] + [(f"variants.{n}", {**spec.config, **v}) for n, v in spec.variants.items()]
    for label, config in overlays:
        try:
            validated = job.config_class.model_validate(config, context=context)
        except ValidationError as error:
            raise SpecError(where + one_line(error, prefix="config." if label == "config" else f"{label}.")) from None
        except ValueError as error:  # unknown task/model raised by field validators outside pydantic's wrapping
            raise SpecError(f"{where}{label}: {error}") from None
        refuse_non_finite(validated.model_dump(), where, (label,))
        for key, param in spec.space.items():
            for value in param.corner_values():
                try:
                    corner = job.config_class.model_validate({**config, key: value}, context=context)
                except ValidationError as error:
                    raise SpecError(f"{where}space.{key}: value {value!r} is invalid: {one_line(error)}") from None
                refuse_non_finite({key: getattr(corner, key)}, where, ("space",))


def non_finite_number(value: Any, loc: tuple = (), huge_ints: bool = False) -> tuple[tuple, float] | None:
    """(where, value) of the first number in parsed YAML that is inf or NaN (`.inf`, `.nan`, or a literal beyond a
    float's range such as 1.0e+400), or with `huge_ints` an integer beyond LARGEST_INT; or None. Pydantic's bounds
    let them through (inf is above any lower bound) and Optuna's samplers, the jobs and Ray fail on them (or never
    finish) only once the sweep's stores exist."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc, value
    if huge_ints and isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
        return loc, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if found := non_finite_number(child, (*loc, key), huge_ints):
            return found
    return None


def number_problem(value: float) -> str:
    if isinstance(value, int):
        return f"beyond any sensible size (got {value:.3g}; at most {LARGEST_INT:,})"
    return f"not a finite number (got {value})"


def refuse_non_finite(values: Any, where: str, loc: tuple = ()) -> None:
    """A number that only became inf or NaN in validation (YAML reads `1e400`, `inf`, `nan` as strings, which
    pydantic turns into floats) is refused like one written `.inf`, and so is an integer beyond any sensible size
    (checked after validation, so that a field's own bound speaks first)."""
    if found := non_finite_number(values, loc, huge_ints=True):
        raise SpecError(f"{where}{_location(found[0])}: {number_problem(found[1])}")


class UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str = "") -> Any:
    """Safe YAML, with its errors as one line; a key given twice, a nesting deeper than Python's stack and an
    alias that contains itself (`a: &x [*x]`, on which every walk over the spec would recurse forever) are
    refused."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        loc = recursive_alias(raw)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]  # a ReaderError has no `problem`
        raise SpecError(f"{where}malformed YAML{line}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{where}malformed spec: nested too deeply") from None
    if loc:
        raise SpecError(f"{where}{_location(loc)}: a YAML alias that contains itself")
    return raw


def recursive_alias(value: Any, loc: tuple = (), open_ids: frozenset[int] = frozenset()) -> tuple | None:
    """Where a mapping or list contains itself, or None."""
    if not isinstance(value, dict | list):
        return None
    if id(value) in open_ids:
        return loc or ("(top level)",)
    inside = open_ids | {id(value)}
    for key, child in value.items() if isinstance(value, dict) else enumerate(value):
        if found := recursive_alias(child, (*loc, key), inside):
            return found
    return None


def parse_spec(text: str, where: str = "", check_files: bool = True) -> SweepSpec:
    """Parse and validate a spec given as YAML text; `where` prefixes error messages (the file name). Pure: the
    spec, the job's config and nothing outside them (no other sweep, run, checkpoint or store; those are checked
    by teachsweep.preflight before a sweep runs), so a finished sweep reads back whatever happened to them. The
    one exception is `check_files`: a new spec's data files must exist; readers pass False, so a moved csv never
    breaks reading."""
    raw = load_yaml(text, where)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}malformed spec: expected a mapping of keys, got {type(raw).__name__}")
    if found := non_finite_number(raw):
        loc, value = found
        raise SpecError(f"{where}{_location(loc)}: {number_problem(value)}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(where + one_line(error)) from None
    refuse_non_finite(spec.model_dump(exclude={"config", "variants"}), where)
    validate_job_config(spec, where, check_files)
    return spec


def read_spec_file(path: str | Path) -> str:
    """A spec file's text; a file that is missing, unreadable or not UTF-8 text is a one-line SpecError."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
            "a spec is a YAML file"
        ) from None
    except OSError as error:
        raise SpecError(f"{path}: cannot read the spec file ({error.strerror})") from None


def load_spec(path: str | Path) -> SweepSpec:
    return parse_spec(read_spec_file(path), where=f"{path}: ")


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two fingerprints."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
