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
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

if TYPE_CHECKING:  # Optuna is a requestor-side dependency; the provider image does without it
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial

Scalar = None | bool | int | float | str
"""What Optuna can store as a categorical choice and what JSON round-trips exactly."""


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: dict[str, list[Scalar]] | None = Field(
        default=None,
        description="Only sample this parameter when each named earlier parameter took one of the listed values.",
    )

    def distribution(self) -> BaseDistribution | None:
        """The Optuna distribution, or ``None`` for a fixed value (never sampled)."""
        raise NotImplementedError

    def grid_values(self) -> list[Scalar] | None:
        """All values for grid search, or ``None`` when the range is continuous."""
        raise NotImplementedError

    def suggest(self, trial: Trial, name: str) -> Scalar:
        """Ask an Optuna trial for this parameter's value (define-by-run, so ``when`` works)."""
        raise NotImplementedError


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

    def grid_values(self) -> list[Scalar]:
        return list(range(self.low, self.high + 1, self.step))

    def suggest(self, trial: Trial, name: str) -> Scalar:
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

    def grid_values(self) -> list[Scalar] | None:
        if self.step is None:
            return None
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        # Same rounding as Optuna applies to stepped floats, so grid and samplers agree.
        return [float(round(self.low + i * self.step, 12)) for i in range(n + 1)]

    def suggest(self, trial: Trial, name: str) -> Scalar:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class CategoricalParam(_Param):
    """One of ``choices`` (strings, numbers, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1, description="Values: strings, numbers, booleans or null.")

    @model_validator(mode="after")
    def _unique(self) -> CategoricalParam:
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError("choices repeat a value; list each value once")
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def grid_values(self) -> list[Scalar]:
        return list(self.choices)

    def suggest(self, trial: Trial, name: str) -> Scalar:
        return trial.suggest_categorical(name, self.choices)


class FixedParam(_Param):
    """A value every configuration gets, e.g. ``random_state`` or ``max_iter``."""

    type: Literal["fixed"]
    value: Scalar = Field(description="The value every configuration gets.")

    def distribution(self) -> None:
        return None

    def grid_values(self) -> list[Scalar]:
        return [self.value]

    def suggest(self, trial: Trial, name: str) -> Scalar:
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
                    raise ValueError(
                        f"{name}.when names {other!r}, which is not an earlier parameter; "
                        "define it before this one"
                    )
                allowed = seen[other].grid_values()
                bad = [v for v in values if allowed is not None and v not in allowed]
                if bad:
                    raise ValueError(f"{name}.when: {other} never takes {bad[0]!r}; use one of {allowed}")
            seen[name] = param
        return self

    @property
    def params(self) -> dict[str, Param]:
        return self.root

    @property
    def is_conditional(self) -> bool:
        return any(p.when for p in self.root.values())

    def fixed_values(self) -> dict[str, Scalar]:
        return {n: p.value for n, p in self.root.items() if isinstance(p, FixedParam)}

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the sampled (non-fixed) parameters."""
        return {n: d for n, p in self.root.items() if (d := p.distribution()) is not None}

    def grid(self) -> dict[str, list[Scalar]]:
        """Grid values of every sampled parameter; raises ``ValueError`` naming a continuous one."""
        if self.is_conditional:
            raise ValueError("grid search does not support `when` conditions; use random or tpe")
        grid = {}
        for name, param in self.root.items():
            if isinstance(param, FixedParam):
                continue
            values = param.grid_values()
            if values is None:
                raise ValueError(
                    f"{name} is continuous; grid search needs a `step` or a list of choices"
                )
            grid[name] = values
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def iter_grid(self) -> list[dict[str, Scalar]]:
        """Every grid configuration, fixed values included (for tests and benchmarks)."""
        grid = self.grid()
        fixed = self.fixed_values()
        return [dict(zip(grid, combo, strict=True), **fixed) for combo in itertools.product(*grid.values())]

    def sample(self, trial: Trial) -> dict[str, Scalar]:
        """One configuration from ``trial``: parameters in order, skipping inactive ones."""
        chosen: dict[str, Scalar] = {}
        for name, param in self.root.items():
            cond = param.when
            if not cond or all(other in chosen and chosen[other] in vals for other, vals in cond.items()):
                chosen[name] = param.suggest(trial, name)
        return chosen
