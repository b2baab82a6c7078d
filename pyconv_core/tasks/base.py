"""What describes an experiment of a task: its ``Params`` (``RunParams`` and its subclasses: the
notebook's parameters cell and the launcher's flags, checked here before any work) following one of the
task's recipes (:class:`Recipe`), a parameter left None taking the recipe's value (:func:`merge_recipe`).
What a task gives the Trainer (a training step and an evaluation) is ``engine.task.Task``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from pyconv_core.engine.distributed import DEFAULT_TIMEOUT_S
from pyconv_core.engine.files import check_run_name
from pyconv_core.engine.logging import workbook_path
from pyconv_core.engine.trainer import TrainConfig
from pyconv_core.layers.pyconv import check_pyconv_plan
from pyconv_core.models.official import load_model_weights
from pyconv_core.registry import list_models

_TYPES = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "list": "a list"}


def check_value(name: str, value: Any, kind: str) -> Any:
    """``value`` as the parameter ``name`` annotated ``kind`` (int, float, bool, str or list, each
    optionally ``| None``; others pass unchecked): an int is taken as a float, nothing else is
    converted, so papermill's ``-p epochs abc`` (the string 'abc') ends in "epochs must be an integer,
    got 'abc'". None passes where the annotation allows it (the recipe's value)."""
    kind, optional = annotation_kind(kind)
    valid = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, (list, tuple)),
    }.get(kind)
    if valid is None or (optional and value is None):
        return value
    if not valid(value):
        hint = (
            f" (papermill reads -p {name} {value} as a number; pass text with -r {name} {value})"
            if (kind == "str" and isinstance(value, (int, float)))
            else ""
        )
        none = " (or None: the recipe's)" if optional else ""
        raise ValueError(f"{name} must be {_TYPES[kind]}{none}, got {value!r}{hint}")
    return float(value) if kind == "float" else value


def annotation_kind(annotation: str) -> tuple[str, bool]:
    """``"float | None"`` and ``"Optional[float]"`` (the spelling papermill's parameter parser reads, in
    the notebooks) -> ``("float", True)``; ``"list[str]"`` -> ``("list", False)``."""
    text = str(annotation).strip().strip("'\"")
    if text.startswith("Optional[") and text.endswith("]"):
        text = f"{text[len('Optional[') : -1]} | None"
    parts = [part.strip() for part in text.split("|")]
    optional = "None" in parts
    kind = next((part for part in parts if part != "None"), "None")
    return kind.split("[")[0].strip(), optional


def at_least(name: str, value: float, minimum: float, why: str = "") -> None:
    """Refuse ``value < minimum`` (and NaN) for the parameter ``name``; ``why`` explains the bound."""
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}{why}, got {value!r}")


def between(name: str, value: float, low: float, high: float) -> None:
    """Refuse ``value`` outside ``[low, high]`` (and NaN) for the parameter ``name``."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


def one_of(name: str, value: Any, choices: Sequence, why: str = "") -> None:
    """Refuse a ``value`` outside ``choices``, listing them (and the closest, for a misspelt word)."""
    if value not in choices:
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}{why}, got {value!r}{hint}")


def check_batch_size(batch_size: int, gpus: int) -> None:
    """A global batch of at least 2 per process: BatchNorm cannot train on a batch of one (its last
    maps may be 1x1, so one sample leaves one value per channel)."""
    if batch_size // max(gpus, 1) < 2:
        raise ValueError(
            f"batch_size must be at least 2 per process: BatchNorm training needs 2 or more "
            f"samples per batch; got {batch_size} over gpus={gpus}"
        )


def check_epochs(epochs: int | None, weights: str) -> None:
    """``epochs >= 1`` (None: the recipe's), or 0 together with ``weights``: then the run only evaluates
    those weights."""
    if epochs is None or (epochs == 0 and weights):
        return
    if not epochs >= 1:
        hint = (
            ""
            if epochs < 0
            else (
                "; epochs 0 evaluates without training and needs weights (a run's best.pt or "
                "last.pt, or the authors' released file)"
            )
        )
        raise ValueError(f"epochs must be >= 1, got {epochs!r}{hint}")


def check_model(name: str, arch: str, families: Sequence[str], depth: int, task: str, full_names: bool = True) -> None:
    """``arch`` is one of ``families`` with a registered ``task`` model ``<family><depth>`` (or
    ``<family>_<depth>``), or (with ``full_names``) such a model's whole name; the error lists what
    the parameter ``name`` and ``depth`` allow."""

    def depth_of(model: str, family: str) -> int | None:
        suffix = model[len(family) :].lstrip("_")
        return int(suffix) if model.startswith(family) and suffix.isdigit() else None

    names = [n for n in list_models(task) if any(depth_of(n, f) is not None for f in families)]
    if full_names and arch in names:
        return
    if arch not in families:
        full = f", or a whole model name such as {names[-1]}" if full_names else ""
        one_of(name, arch, families, f" (with depth){full}")
    one_of("depth", depth, sorted(d for n in names if (d := depth_of(n, arch)) is not None), f" for {name} {arch!r}")


@dataclass(frozen=True)
class Recipe:
    """What an experiment of a task follows unless a parameter says otherwise: optimizer, schedule and
    sizes. A task's recipes subclass it with their own fields; the task's ``Params`` has a field of the
    same name for each value a user may change, None meaning the recipe's (:func:`merge_recipe`)."""

    lr: float  # for a batch of lr_reference_batch, scaled linearly with batch_size
    lr_reference_batch: int
    batch_size: int  # global batch over all processes
    epochs: int
    weight_decay: float
    schedule: str  # multistep | cosine | poly
    momentum: float = 0.9
    milestone_fractions: tuple[float, ...] = ()  # multistep: lr x0.1 at these fractions of the run's epochs
    warmup_epochs: float = 0.0  # linear warmup (at most the run's epochs)
    poly_power: float = 0.9
    amp: str = "none"  # none | bf16 | fp16


RecipeT = TypeVar("RecipeT", bound=Recipe)
ModelT = TypeVar("ModelT", bound=nn.Module)


def merge_recipe(recipe: RecipeT, params: object) -> RecipeT:
    """``recipe`` with the values ``params`` sets: each attribute named like a recipe field that is not None."""
    given = {f.name: value for f in dataclasses.fields(recipe) if (value := getattr(params, f.name, None)) is not None}
    return dataclasses.replace(recipe, **given)


@dataclass
class RunParams:
    """The parameters every task's ``Params`` shares: how a run executes, its epochs and the weights it
    starts from. A task's ``Params`` subclasses this (redeclaring a field changes its default) and adds its
    own; a field left None takes the followed recipe's value (:meth:`merged_recipe`).

    Every value is checked when the parameters are made (:meth:`check`), before any data is read
    or model built: a wrong type, range or choice raises a ValueError that says what is allowed.
    A notebook builds them from its parameters cell with :meth:`from_namespace`.
    """

    AMP_CHOICES: ClassVar[tuple[str, ...]] = ("none", "bf16", "fp16")

    amp: str | None = None  # none | bf16 | fp16; None: the recipe's
    # NHWC / NDHWC memory format: PyConv networks train 1.3-1.9x faster so on a CPU (naive plans; BENCHMARKS.md)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    # PyConv execution plan: naive (the authors' per-level convolutions: results that never depend on the machine's
    # load) | auto (the fastest, timed once per machine and layer shape) | a partition such as 0|123
    pyconv_plan: str = "naive"
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    gpus: int = 1  # processes; >1 starts torchrun
    # seconds a DDP collective (and joining the process group) waits for the other processes before the job ends
    # naming this parameter: a stalled rank (a hung read, a deadlock) ends the job in minutes, not after torch's
    # 30; 300 s is far above the longest wait of a healthy run (the others wait while rank 0 writes a checkpoint)
    ddp_timeout_s: float = DEFAULT_TIMEOUT_S
    # times torchrun restarts every process of a run after one fails (gpus > 1); a restarted run resumes last.pt
    max_restarts: int = 0
    seed: int = 0
    run_name: str = ""  # runs/<run_name>/ (one folder name); default: the model, recipe or data, and seed
    runs_dir: str = "runs"
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # progress bars (off under papermill / CI)
    log_every: int = 10  # optimizer steps per training-loss row of metrics.jsonl (the loss curve)
    eval_every: int = 1  # evaluate every this many epochs (and after the last)
    resume: bool = False  # continue runs/<run_name>/last.pt
    epochs: int | None = None  # passes over the training data; None: the recipe's; 0 with weights: only evaluate them
    # the whole model's starting weights: a run's best.pt / last.pt or the authors' released file (relative to the
    # workbook root; it replaces backbone weights); with epochs 0 the run only evaluates them
    weights: str = ""

    def __post_init__(self) -> None:
        self.check()
        self.check_recipe()

    @classmethod
    def from_namespace(
        cls: type[ParamsT], namespace: Mapping[str, Any], *, own: Iterable[str] = (), **overrides: Any
    ) -> ParamsT:
        """The experiment a notebook's parameters describe: ``namespace`` is the notebook's ``globals()``
        after its ``parameters`` cell, whose annotated names (``epochs: int = 3``) are its parameters.
        Each is taken as the field of that name, then ``overrides`` are applied; ``own`` names the
        parameters the notebook uses itself (what to draw, a second network's weights). A parameter that
        is neither a field nor ``own`` nor overridden is an error, so none is declared and then ignored."""
        declared = namespace.get("__annotations__")
        if not declared:
            raise ValueError(
                "from_namespace reads the notebook's parameters from the annotations of its parameters "
                "cell (epochs: int = 3): call it with globals() after that cell has run"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        own = set(own)
        unknown = [name for name in declared if name not in fields | own | set(overrides)]
        if unknown:
            raise ValueError(
                f"notebook parameters {', '.join(unknown)} are not parameters of {cls.__module__}."
                f"{cls.__qualname__}: pass them on, or list them in own= if the notebook uses them itself"
            )
        values = {name: namespace[name] for name in declared if name in fields and name not in overrides}
        return cls(**values, **overrides)

    def merged_recipe(self) -> Recipe:
        """The recipe this experiment follows (one of its task's ``RECIPES``), with the values its parameters
        set (:func:`merge_recipe`)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse wrong types, ranges and choices (a task's ``Params`` extends it with its fields);
        ints given for float fields become floats."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name), str(f.type)))
        if self.amp is not None:
            one_of("amp", self.amp, self.AMP_CHOICES, " (or None: the recipe's)")
        check_pyconv_plan(self.pyconv_plan)
        at_least("gpus", self.gpus, 1)
        if not self.ddp_timeout_s > 0:
            raise ValueError(f"ddp_timeout_s must be > 0 seconds, got {self.ddp_timeout_s!r}")
        at_least("max_restarts", self.max_restarts, 0)
        at_least("num_workers", self.num_workers, 0)
        if self.run_name:  # empty: the task's default name
            check_run_name(self.run_name)
        at_least("log_every", self.log_every, 1, " optimizer step")
        at_least("eval_every", self.eval_every, 1, " epoch")
        check_epochs(self.epochs, self.weights)
        if self.weights and not workbook_path(self.weights).is_file():
            raise FileNotFoundError(
                f"weights {self.weights!r} is not a file ({workbook_path(self.weights)}): give a "
                f"run's best.pt or last.pt, or the authors' released checkpoint"
            )
        for name in ("lr", "batch_size"):
            if (value := getattr(self, name, None)) is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None: the recipe's), got {value!r}")

    def check_recipe(self) -> None:
        """Refuse what the merged recipe gets wrong: a batch too small for BatchNorm on each process."""
        check_batch_size(self.merged_recipe().batch_size, self.gpus)

    @property
    def weights_tag(self) -> str:
        """What the default run name adds for a run from ``weights``: ``-eval-<source>`` (epochs 0) or
        ``-from-<source>``, where ``<source>`` is the file's name, or ``<run>-best`` for a run's ``best.pt``:
        an evaluation or a fine-tuning never lands in the folder of the run its weights come from."""
        if not self.weights:
            return ""
        path = Path(self.weights)
        source = f"{path.parent.name}-{path.stem}" if path.name in ("best.pt", "last.pt") else path.stem
        return f"-{'eval' if self.epochs == 0 else 'from'}-{source}"

    def load_weights(self, model: ModelT) -> ModelT:
        """``model`` with the whole-model ``weights`` loaded, if given (a run's checkpoint or the authors' layout:
        ``models.official.load_model_weights``); the Trainer records their path, and a resume replaces them
        with ``last.pt``."""
        if self.weights:
            load_model_weights(model, workbook_path(self.weights))
        return model

    def train_config(self, run_name: str, **fields: Any) -> TrainConfig:
        """The ``TrainConfig`` of this experiment: the merged recipe's optimizer and schedule, these
        parameters' execution settings (``run_name`` unless one is given), every parameter recorded as
        ``extra`` (those left None as the recipe's value: what ran), and ``fields`` for what the task adds."""
        r = self.merged_recipe()
        extra = {
            name: getattr(r, name) if value is None and hasattr(r, name) else value
            for name, value in dataclasses.asdict(self).items()
        }
        return TrainConfig(
            **{
                **dict(
                    run_name=self.run_name or f"{run_name}{self.weights_tag}",
                    epochs=r.epochs,
                    batch_size=r.batch_size,
                    lr=r.lr,
                    lr_reference_batch=r.lr_reference_batch,
                    momentum=r.momentum,
                    weight_decay=r.weight_decay,
                    schedule=r.schedule,
                    milestones=tuple(f * r.epochs for f in r.milestone_fractions),
                    poly_power=r.poly_power,
                    warmup_epochs=min(r.warmup_epochs, r.epochs),
                    amp=None if r.amp == "none" else r.amp,
                    channels_last=self.channels_last,
                    compile=self.compile,
                    pyconv_plan=self.pyconv_plan,
                    sync_bn=self.sync_bn,
                    seed=self.seed,
                    resume=self.resume,
                    num_workers=self.num_workers,
                    runs_dir=self.runs_dir,
                    progress=self.progress,
                    log_every=self.log_every,
                    eval_every=self.eval_every,
                    weights=str(workbook_path(self.weights)) if self.weights else "",
                    extra=extra,
                ),
                **fields,
            }
        )


ParamsT = TypeVar("ParamsT", bound=RunParams)
