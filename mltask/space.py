"""The search space: serialisable parameter value objects, after Optuna's ``distributions``.

A search space is an ordered mapping ``name -> parameter``. Names address estimator
parameters the scikit-learn way (``svc__C`` for step ``svc`` of a pipeline). Each parameter
knows how to become an Optuna distribution (for the adaptive samplers) and, where it is
finite, its grid values (for grid search). JSON shorthands keep templates short:
a list is a categorical parameter, a scalar a fixed one, as in ``GridSearchCV``'s
``param_grid``.

A parameter may carry ``when``: it is only part of a configuration when an earlier
parameter took one of the listed values (``{"when": {"svc__kernel": ["poly"]}}`` for a
polynomial degree). Optuna's define-by-run API samples such spaces natively, so this is the
whole of our support for conditional spaces.

Values are JSON scalars or flat lists of them (``"hidden_layer_sizes": [[50], [100, 50]]``
is a categorical over two layer layouts). Optuna's categorical distribution holds scalars
only, so a categorical with list choices is handed to Optuna as JSON-encoded strings and
decoded here (:meth:`_Param.to_optuna`, :meth:`_Param.from_optuna`): a trial's parameters,
the wire protocol, the results and the refit all carry the real list. Objects (dicts) are
refused: JSON keys are always strings, so ``class_weight: {"1": 5}`` would never match the
integer label 1, silently.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, model_validator

from mltask.errors import located

if TYPE_CHECKING:  # Optuna is a requestor-side dependency; the provider image does without it
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial

Scalar = None | bool | int | float | str
"""What Optuna can store as a categorical choice and what JSON round-trips exactly."""

MAX_LIST_VALUE = 100
MAX_GRID_SIZE = 1_000_000
"""Most configurations grid search enumerates (Optuna's GridSampler holds them all in memory)."""

NO_OBJECTS = (
    "objects are not supported as parameter values (JSON keys are strings, so class_weight "
    '{"1": 5} would not match the integer label 1); use a scalar or a list, e.g. class_weight "balanced"'
)


def _plain_value(value: Any) -> Any:
    """Refuse, with a message that says why, what pydantic would report as a union mismatch."""
    if isinstance(value, dict):
        raise ValueError(NO_OBJECTS)
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, (list, tuple, dict)) for item in value):
            raise ValueError("a list value may hold only null, booleans, numbers and strings, not lists or objects")
        return list(value)
    return value


Value = Annotated[
    Scalar | Annotated[list[Scalar], Field(max_length=MAX_LIST_VALUE)], BeforeValidator(_plain_value)
]
"""A parameter value: a JSON scalar or a flat list of them (a tuple parameter of scikit-learn)."""


def matches(value: Value, allowed: list[Value]) -> bool:
    """Whether ``value`` is among ``allowed``; floats within rounding, as Optuna's stepped floats
    (0.1 * 3 is 0.30000000000000004, which a ``when`` listing 0.3 means)."""
    return any(_same(value, a) for a in allowed)


def _same(a: Value, b: Value) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: dict[str, list[Value]] | None = Field(
        default=None,
        description="Only sample this parameter when each named earlier parameter took one of the listed values.",
    )

    def distribution(self) -> BaseDistribution | None:
        """The Optuna distribution, or ``None`` for a fixed value (never sampled)."""
        raise NotImplementedError

    def grid_size(self) -> int | float | None:
        """How many grid values there are, counted without listing them; ``None`` when continuous."""
        raise NotImplementedError

    def grid_values(self) -> list[Value] | None:
        """All values for grid search, or ``None`` when the range is continuous."""
        raise NotImplementedError

    def takes(self, value: Value) -> bool:
        """Whether a configuration can give this parameter ``value`` (for ``when`` conditions)."""
        raise NotImplementedError

    def suggest(self, trial: Trial, name: str) -> Value:
        """Ask an Optuna trial for this parameter's value (define-by-run, so ``when`` works)."""
        raise NotImplementedError

    def to_optuna(self, value: Value) -> Scalar:
        """``value`` as Optuna holds it (see the module docstring); most parameters hold their own."""
        return value  # type: ignore[return-value]  # only categoricals hold lists, and override this

    def from_optuna(self, value: Scalar) -> Value:
        return value


class IntParam(_Param):
    """An integer in ``[low, high]``, optionally on a log scale or with a step."""

    type: Literal["int"]
    low: int = Field(description="Smallest value (inclusive).")
    high: int = Field(description="Largest value (inclusive).")
    step: int = Field(default=1, ge=1, description="Spacing of values; grid search uses every step.")
    log: bool = Field(default=False, description="Sample on a log scale (low must be > 0).")

    @model_validator(mode="after")
    def _check_range(self) -> IntParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log scale and step cannot be combined; drop one of them")
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid_size(self) -> int:
        return (self.high - self.low) // self.step + 1

    def grid_values(self) -> list[Value]:
        return list(range(self.low, self.high + 1, self.step))

    def takes(self, value: Value) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )

    def suggest(self, trial: Trial, name: str) -> Value:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


class FloatParam(_Param):
    """A float in ``[low, high]``, optionally on a log scale or quantised by ``step``."""

    type: Literal["float"]
    low: float = Field(description="Smallest value (inclusive).")
    high: float = Field(description="Largest value (inclusive).")
    step: float | None = Field(default=None, gt=0, description="Quantise to this step; needed for grid search.")
    log: bool = Field(default=False, description="Sample on a log scale (low must be > 0).")

    @model_validator(mode="after")
    def _check_range(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log scale and step cannot be combined; drop one of them")
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid_size(self) -> int | float | None:
        if self.step is None:
            return None
        steps = (self.high - self.low) / self.step
        return math.floor(steps + 1e-9) + 1 if math.isfinite(steps) else math.inf  # a step of 1e-320...

    def grid_values(self) -> list[Value] | None:
        size = self.grid_size()
        if size is None:
            return None
        # Same rounding as Optuna applies to stepped floats, so grid and samplers agree.
        return [float(round(self.low + i * self.step, 12)) for i in range(int(size))]  # type: ignore[operator]

    def takes(self, value: Value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-8  # Optuna's own test (FloatDistribution._contains)

    def suggest(self, trial: Trial, name: str) -> Value:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class CategoricalParam(_Param):
    """One of ``choices`` (strings, numbers, booleans, null, or lists of those)."""

    type: Literal["categorical"]
    choices: list[Value] = Field(
        min_length=1, description="Values: strings, numbers, booleans, null, or lists of those (e.g. layer sizes)."
    )

    @model_validator(mode="after")
    def _unique(self) -> CategoricalParam:
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError("choices repeat a value; list each value once")
        return self

    @property
    def _encoded(self) -> bool:
        return any(isinstance(c, list) for c in self.choices)

    def to_optuna(self, value: Value) -> Scalar:
        # All choices encoded, not only the lists, so a string "[50]" cannot collide with [50].
        return json.dumps(value) if self._encoded else value  # type: ignore[return-value]

    def from_optuna(self, value: Scalar) -> Value:
        return json.loads(value) if self._encoded else value  # type: ignore[arg-type]

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution([self.to_optuna(c) for c in self.choices])

    def grid_size(self) -> int:
        return len(self.choices)

    def grid_values(self) -> list[Value]:
        return list(self.choices)

    def takes(self, value: Value) -> bool:
        return matches(value, self.choices)

    def suggest(self, trial: Trial, name: str) -> Value:
        return self.from_optuna(trial.suggest_categorical(name, [self.to_optuna(c) for c in self.choices]))


class FixedParam(_Param):
    """A value every configuration gets, e.g. ``random_state`` or ``max_iter``."""

    type: Literal["fixed"]
    value: Value = Field(description="The value every configuration gets (a list too, e.g. [1, 2] for a range).")

    def distribution(self) -> None:
        return None

    def grid_size(self) -> int:
        return 1

    def grid_values(self) -> list[Value]:
        return [self.value]

    def takes(self, value: Value) -> bool:
        return matches(value, [self.value])

    def suggest(self, trial: Trial, name: str) -> Value:
        return self.value


def _check_bounds(low: float, high: float, log: bool) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("low and high must be finite numbers")
    if low > high:
        raise ValueError(f"empty range: low ({low}) is above high ({high}); swap them")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0 (got {low}); raise low or set log to false")


Param = Annotated[IntParam | FloatParam | CategoricalParam | FixedParam, Field(discriminator="type")]


class SearchSpace(RootModel[dict[str, Param]]):
    """Ordered ``name -> parameter``; order matters only for ``when`` conditions."""

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthands(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for name, spec in data.items():
            if isinstance(spec, list):
                spec = {"type": "categorical", "choices": spec}
            elif not isinstance(spec, dict):
                spec = {"type": "fixed", "value": spec}
            elif "type" not in spec:
                raise located('a parameter object needs "type" (int, float, categorical or fixed); ' + NO_OBJECTS, name)
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if not self.root:
            raise ValueError("the search space is empty; add at least one parameter")
        seen: dict[str, Param] = {}
        for name, param in self.root.items():
            for other, values in (param.when or {}).items():
                if other not in seen:
                    raise located(f"{other!r} is not an earlier parameter; define it before {name!r}", name, "when")
                _check_condition(seen[other], other, values, (name, "when", other))
            seen[name] = param
        return self

    @property
    def params(self) -> dict[str, Param]:
        return self.root

    @property
    def is_conditional(self) -> bool:
        return any(p.when for p in self.root.values())

    def fixed_values(self) -> dict[str, Value]:
        return {n: p.value for n, p in self.root.items() if isinstance(p, FixedParam)}

    def candidate_values(self) -> dict[str, list[Value]]:
        """Every value a fixed or categorical parameter can hand the estimator (numbers are ranges)."""
        return {
            n: [p.value] if isinstance(p, FixedParam) else list(p.choices)
            for n, p in self.root.items() if isinstance(p, (FixedParam, CategoricalParam))
        }

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the sampled (non-fixed) parameters."""
        return {n: d for n, p in self.root.items() if (d := p.distribution()) is not None}

    def optuna_params(self, params: dict[str, Value]) -> dict[str, Scalar]:
        """The sampled parameters of a configuration as Optuna holds them (to rebuild a study)."""
        sampled = self.distributions()
        return {n: self.root[n].to_optuna(v) for n, v in params.items() if n in sampled}

    def grid_size(self) -> int:
        """Configurations in the grid, counted without listing them (a step of 1e-9 must not take minutes).

        Raises ``ValueError`` naming a continuous parameter or the size past :data:`MAX_GRID_SIZE`.
        """
        if self.is_conditional:
            raise ValueError("grid search does not support `when` conditions; use random or tpe")
        size: int | float = 1
        for name, param in self.root.items():
            count = param.grid_size()
            if count is None:
                raise ValueError(f"{name} is continuous; grid search needs a `step` or a list of choices")
            size *= count
        if size > MAX_GRID_SIZE:
            shown = f"{size:,}" if size < 1e15 else f"{float(size):.3g}"
            raise ValueError(
                f"the grid has {shown} configurations, more than grid search enumerates ({MAX_GRID_SIZE:,}); "
                "use larger steps or fewer choices, or use random or tpe"
            )
        return int(size)

    def grid(self) -> dict[str, list[Scalar]]:
        """Grid values of every sampled parameter, as Optuna's GridSampler takes them.

        Raises ``ValueError`` as :meth:`grid_size` does, before listing any value.
        """
        self.grid_size()
        return {
            name: [param.to_optuna(v) for v in param.grid_values() or ()]
            for name, param in self.root.items() if not isinstance(param, FixedParam)
        }

    def iter_grid(self) -> list[dict[str, Value]]:
        """Every grid configuration, fixed values included (for tests and benchmarks)."""
        grid = {n: self.root[n].grid_values() or [] for n in self.grid()}
        fixed = self.fixed_values()
        return [dict(zip(grid, combo, strict=True), **fixed) for combo in itertools.product(*grid.values())]

    def sample(self, trial: Trial) -> dict[str, Value]:
        """One configuration from ``trial``: parameters in order, skipping inactive ones."""
        chosen: dict[str, Value] = {}
        for name, param in self.root.items():
            cond = param.when
            if not cond or all(other in chosen and matches(chosen[other], vals) for other, vals in cond.items()):
                chosen[name] = param.suggest(trial, name)
        return chosen


def _check_condition(param: Param, name: str, values: list[Value], at: tuple[str, ...]) -> None:
    """A ``when`` must be able to fire: every listed value is one ``param`` can take."""
    if isinstance(param, FloatParam) and param.step is None:
        raise located(
            f"{name} is a continuous float, which never equals a listed value; give {name} a `step` "
            "(then list values on it) or make it a list of choices", *at,
        )
    bad = next((v for v in values if not param.takes(v)), None)
    if bad is not None or not values:
        ranged = isinstance(param, (IntParam, FloatParam)) and (param.grid_size() or 0) > 20
        options = (
            f"a value from {param.low} to {param.high} in steps of {param.step}" if ranged  # type: ignore[union-attr]
            else f"one of {param.grid_values()}"
        )
        never = f"{name} never takes {bad!r}" if values else "no values are listed"
        raise located(f"{never}; use {options}", *at)
