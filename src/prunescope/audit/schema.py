"""The typed audit result and its JSON form (standard library only: no torch, no numpy).

:class:`AuditResult` is what :func:`prunescope.audit.run_audit` returns, what ``audit.json``
holds and what :mod:`prunescope.report` renders. ``to_json()`` and ``from_json()`` round-trip
exactly (floats are written with ``repr`` precision; NaN is stored as null). ``version`` is
:data:`VERSION`; reading a file of another version is one :class:`AuditFileError` line saying
whether it is older or newer. The layout is described in ``docs/audit.md``.

Per-model scalar metrics live in ``values`` (``{name: value}``) beside the typed fields, so a
metric added to :data:`prunescope.audit.metrics.MODEL_METRICS` needs no change here;
``metric_columns`` carries each one's column label and format to the report. Three parts stay
plain JSON (:data:`Json`): a model's ``cost`` record (written by the experiment into its run),
a population's ``interdependence`` note and the result's ``images``. A field declared with
:data:`OMIT_IF_NONE` is left out of the JSON form when it is None (as the dictionaries it
replaced left the key out), and read back as None when absent.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from prunescope.errors import PrunescopeError

VERSION = "prunescope.audit/4"  # 4 added PopulationAudit.representations
Json = Any  # a JSON value kept as is (cost records, the interdependence note, images)
OMIT_IF_NONE = {"omit_if_none": True}  # field metadata: no key in the JSON form when None


class AuditFileError(PrunescopeError):
    """An audit file that cannot be read (missing, not JSON, another version, incomplete)."""


@dataclass
class MetricColumn:
    """How the report shows one per-model metric: its key in ``values``, column label, and
    whether it is a fraction (shown as a percentage)."""

    name: str
    label: str
    percent: bool = False


@dataclass
class Reliability:
    """Points of a reliability diagram: mean confidence, observed accuracy, count per bin."""

    confidence: list[float]
    accuracy: list[float]
    count: list[int]


@dataclass
class FlipRecord:
    """A compressed model's disagreements with the dense run of the same seed."""

    count: int
    rate: float
    paired_dense: str | None


@dataclass
class ModelMetrics:
    """One model: top-1 accuracy, class recall/precision, the table's scalar ``values``,
    rows of non-finite logits, whether it collapsed, its cost record and (compressed) flips."""

    run: str | None
    seed: int | None
    accuracy: float
    non_finite: int
    collapsed: bool
    recall: list[float | None]
    precision: list[float | None]
    worst_class: int | None
    worst_class_recall: float | None
    values: dict[str, float | None]
    reliability: Reliability | None = None
    cost: Json = None
    flips: FlipRecord | None = None


@dataclass
class Spread:
    """Mean, std, min, max over a population's models and an interval (``interval_kind``)."""

    mean: float
    std: float
    min: float
    max: float
    interval: list[float]
    interval_kind: str


@dataclass
class CIESummary:
    """Compression-identified exemplars: ``definition`` says what was counted."""

    definition: str
    dense_models: int
    compressed_models: int
    warning: str | None
    count: int
    fraction: float
    per_class: list[int]
    dense_accuracy_cie: float | None
    dense_accuracy_rest: float | None
    compressed_accuracy_cie: float | None
    compressed_accuracy_rest: float | None
    positions: list[int] | None = None
    dense_modal: list[int] | None = None
    compressed_modal: list[int] | None = None


@dataclass
class ClassTest:
    """Welch's test of one class (``test`` says when none was possible)."""

    t: float | None
    p: float | None
    p_holm: float | None
    affected: bool
    affected_uncorrected: bool
    direction: str
    test: str


@dataclass
class WelchSummary:
    """The multiple-testing correction and what to expect by chance without it."""

    correction: str
    alpha: float
    tested: int
    affected: int
    affected_uncorrected: int
    expected_false_uncorrected: float


@dataclass
class Intervals:
    """Bootstrap 95% intervals ``[low, high]`` of each entry of a :class:`GroupMetric`."""

    overall: list[float | None]
    by_group: dict[str, list[float | None]]
    min: list[float | None]
    max: list[float | None]
    difference: list[float | None]
    ratio: list[float | None]


@dataclass
class GroupMetric:
    """One metric disaggregated by class or group (a Fairlearn MetricFrame summary):
    ``difference`` is max - min over the groups, ``ratio`` min / max; ``ci`` only when the
    population was bootstrapped."""

    overall: float | None
    by_group: dict[str, float | None]
    min: float | None
    max: float | None
    difference: float | None
    ratio: float | None
    ci: Intervals | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class BiasAmplification:
    """Bias amplification of one attribute w.r.t. the two groups: the mean over the models
    (``per_model``), or None with the ``reason`` it is undefined."""

    value: float | None
    per_model: list[float | None] | None = field(default=None, metadata=OMIT_IF_NONE)
    reason: str | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class RocCurve:
    """At most ``risk.ROC_POINTS`` points of a ROC curve."""

    fpr: list[float]
    tpr: list[float]


@dataclass
class RiskScore:
    """How well one dense-model signal predicts a target (``risk.evaluate``): AUROC and curve
    (None for a constant target), precision at k = ``positives``, the base rate, and how many
    examples had no finite score (``unscored``)."""

    positives: int
    base_rate: float | None
    precision_at_k: float | None
    auroc: float | None
    roc: RocCurve | None
    unscored: int


@dataclass
class RiskTargets:
    """Every risk signal scored against the CIEs and against the flipped examples."""

    cie: dict[str, RiskScore]
    flip: dict[str, RiskScore]


@dataclass
class Distribution:
    """Mean and quartiles of a per-example quantity over ``count`` (model, example) pairs (None
    when ``count`` is 0)."""

    count: int
    mean: float | None
    q1: float | None
    median: float | None
    q3: float | None


@dataclass
class CIEContrast:
    """One representation metric on a compressed population's CIEs and on the rest, for its
    own models and for the dense models (``dense_*`` None when they lack the metric)."""

    cie: Distribution
    rest: Distribution
    dense_cie: Distribution | None
    dense_rest: Distribution | None


@dataclass
class RepresentationMetrics:
    """Q-score and prediction depth (:mod:`prunescope.audit.representations`) of a
    population's ``models``: over every example, and for a compressed population on its CIEs
    vs the rest; ``layers`` probed, k-NN ``k`` and ``bank`` size, Q-score ``top``."""

    models: int
    layers: int | None
    k: int | None
    bank: int | None
    top: int | None
    q_score: Distribution
    prediction_depth: Distribution
    q_score_cie: CIEContrast | None = field(default=None, metadata=OMIT_IF_NONE)
    prediction_depth_cie: CIEContrast | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class PopulationAudit:
    """One population (the dense one, or a compressed method at one sparsity)."""

    label: str
    method: str | None
    sparsity: float | None
    k: int
    models: list[ModelMetrics]
    accuracy: Spread
    recall: list[float | None]
    worst_class: int | None
    worst_class_recall: float | None
    values: dict[str, float | None]
    collapsed: list[str]
    by_class: dict[str, GroupMetric]
    interdependence: Json
    reliability: Reliability | None = None
    direct_sparsity: float | None = None
    effective_sparsity: float | None = None
    by_group: dict[str, GroupMetric] | None = None
    bias_amplification: dict[str, BiasAmplification] | None = None
    cie: CIESummary | None = None
    flip_count: float | None = None
    flip_rate: float | None = None
    normalised_change: list[float | None] | None = None
    welch: list[ClassTest] | None = None
    welch_summary: WelchSummary | None = None
    risk: RiskTargets | None = None
    representations: RepresentationMetrics | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class PairSpread:
    """Mean, std, min and max of a quantity over every pair of a population's models."""

    mean: float
    std: float
    min: float
    max: float


@dataclass
class PopulationNoise:
    """The noise of one population (:func:`prunescope.audit.noise.population_noise`): ``kind``
    says what its models differ in (``seeds``, ``threads``); ``churn`` (fraction of examples
    two models label differently) and ``weight_distance`` (L2) are over its ``pairs``; the
    standard deviations are over its models; None with the reason in ``note`` (one model, or
    no weights)."""

    label: str
    kind: str
    k: int
    runs: list[str | None]
    pairs: int
    churn: PairSpread | None
    accuracy_std: float | None
    per_class_accuracy_std: list[float | None] | None
    weight_distance: PairSpread | None
    note: str | None


@dataclass
class CIEFloor:
    """CIEs between two disjoint dense populations of ``size`` models each, over ``splits``
    balanced splits (all of them when ``exhaustive``): count mean, min, max; mean per class."""

    size: int
    splits: int
    exhaustive: bool
    mean: float
    min: int
    max: int
    per_class: list[float]


@dataclass
class CIEVersusFloor:
    """A compressed population's CIE ``count`` beside the floor of ``floor_size`` models a
    side: ``excess`` over its mean, ``above_range`` when above every split (None without a
    floor; ``note`` says why, or that a smaller floor size had to be used)."""

    label: str
    k: int
    count: int
    floor_size: int | None
    floor_mean: float | None
    floor_min: int | None
    floor_max: int | None
    excess: float | None
    above_range: bool | None
    note: str | None


@dataclass
class NoiseFloor:
    """The noise floor under the CIEs (:mod:`prunescope.audit.noise`): the noise of the dense,
    each compressed and the thread-count population, the dense-vs-dense CIE floors and each
    compressed population's CIEs against its floor."""

    populations: list[PopulationNoise]
    cie_floors: list[CIEFloor]
    cie_comparison: list[CIEVersusFloor]


@dataclass
class NestedLevel:
    """One level of a nested network: its ``sparsity``, the ``population`` of its models (None
    when the audit holds none at this level) and the populations trained separately at the
    same sparsity (``dense``, the dense population, for the dense level)."""

    sparsity: float
    population: str | None
    separate: list[str]


@dataclass
class NestedNetwork:
    """Populations that are the levels of one dense network (ELSA: :mod:`prunescope.nested`,
    checkpoints whose ``method`` metadata holds ``levels``): the method's label and one entry
    per level, the sparsest first."""

    method: str
    levels: list[NestedLevel]


@dataclass
class DatasetInfo:
    name: str | None
    split: str | None
    num_examples: int
    num_classes: int
    classes: list[str]
    group_names: list[str]
    binary: bool


@dataclass
class Settings:
    n_boot: int
    alpha: float
    correction: str


@dataclass
class AuditResult:
    """The whole audit (see ``docs/audit.md``)."""

    version: str
    dataset: DatasetInfo
    settings: Settings
    dense: PopulationAudit
    populations: list[PopulationAudit]
    focus: list[str]
    risk_signals: list[str]
    metric_columns: list[MetricColumn]
    noise_floor: NoiseFloor | None = None
    nested: list[NestedNetwork] | None = field(default=None, metadata=OMIT_IF_NONE)
    warnings: list[str] = field(default_factory=list)
    images: Json = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def focus_populations(self) -> list[PopulationAudit]:
        """The populations named in ``focus``, in the order of ``populations``."""
        return [block for block in self.populations if block.label in self.focus]

    def to_dict(self) -> dict:
        """The JSON-able form (nested dicts and lists)."""
        return _encode(self)

    def to_json(self) -> str:
        """``audit.json`` text; :meth:`from_json` reads it back equal to ``self``."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: object, where: str = "the audit") -> AuditResult:
        """The typed result of a dictionary of this :data:`VERSION`, or one AuditFileError
        line."""
        check_version(data, where)
        try:
            return _decode(cls, data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AuditFileError(f"{where} is incomplete or malformed ({type(exc).__name__}: "
                                 f"{exc}); re-run `prunescope audit` to regenerate it") from None

    @classmethod
    def from_json(cls, text: str, where: str = "the audit") -> AuditResult:
        """Parse ``audit.json`` text (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise AuditFileError(f"{where} is not JSON; give the audit.json written by "
                                 "`prunescope audit`") from None
        return cls.from_dict(data, where)


def check_version(data: object, where: str) -> None:
    """AuditFileError (one line: older or newer) unless ``data["version"] == VERSION``."""
    version = data.get("version") if isinstance(data, dict) else None
    if version == VERSION:
        return
    number = _number(version)
    if number is not None and number < _number(VERSION):
        raise AuditFileError(f"{where} has version {version!r}, older than the "
                             f"{VERSION!r} this prunescope reads; re-run `prunescope audit` "
                             "to regenerate it")
    if number is not None:
        raise AuditFileError(f"{where} has version {version!r}, newer than the {VERSION!r} "
                             "this prunescope reads; upgrade prunescope to render it")
    raise AuditFileError(f"{where} has version {version!r}, but this prunescope reads "
                         f"{VERSION!r}; re-run `prunescope audit` to regenerate it")


def _number(version: object) -> int | None:
    prefix, _, number = str(version).rpartition("/")
    return int(number) if prefix == "prunescope.audit" and number.isdigit() else None


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(kind: Any, value: Any) -> Any:
    if value is None or kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _decode(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"{kind.__name__} needs an object, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:  # a key no field holds would be dropped silently on the way through
            raise ValueError(f"{kind.__name__} has no field {unknown[0]!r}")
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _decode(hints[f.name], value[f.name])
                       for f in dataclasses.fields(kind) if f.name in value
                       or _required(f)})
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return [_decode(args[0], v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return {k: _decode(args[1], v) for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
