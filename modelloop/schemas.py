"""The contracts between training, serving and monitoring.

* :class:`ModelMetadata` describes a registered model version: its ONNX inputs and outputs,
  feature names, class labels, metrics, lineage and the export parity result.
* :class:`PredictionEvent` is what serving sends to the monitoring sidecar for each predicted row.
* :class:`Feedback` is a true label that arrives later and is joined to its event by request id.

ONNX graph conventions (training writes them, serving relies on them): one float32 input named
``input`` whose first axis is the dynamic batch axis; a classifier outputs ``probabilities``
``[batch, n_classes]`` (softmax inside the graph); a regressor outputs ``prediction``
``[batch, 1]``; an anomaly detector outputs ``score`` ``[batch]``. Preprocessing (imputation,
scaling) is inside the graph, so serving passes raw features, NaN included.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import numpy as np

INPUT_NAME = "input"
CATEGORIES_INPUT = "categories"
"""A model with categorical features takes their raw strings in this second input
(``[rows, n_categorical]``, modelloop/categorical.py); ``input`` holds the numeric ones."""
PROBABILITIES = "probabilities"
PREDICTION = "prediction"
SCORE = "score"

# Reserved columns of a version's reference sample (reference.parquet), beside the features.
REF_LABEL = "_ml_label"
REF_PREDICTION = "_ml_prediction"
REF_PROBA_PREFIX = "_ml_proba_"
REF_SPLIT = "_ml_split"
"""``train`` for rows the model was fitted on, ``holdout`` for rows it never saw. Drift is
measured against all rows; the confidence-based accuracy estimate is calibrated on the holdout
rows only, since a model is over-confident on its own training rows."""

ALIAS_PRODUCTION = "production"
ALIAS_PREVIOUS = "previous"
ALIAS_CHALLENGER = "challenger"
"""The version a retraining job proposes: shadowed by serving, judged on live labels by the
sidecar (monitoring/live_gate.py)."""


class Task(StrEnum):
    classification = "classification"
    regression = "regression"
    anomaly = "anomaly"


class TensorSpec(BaseModel):
    """One ONNX input or output: name, element type and shape (``None`` marks a dynamic axis)."""

    name: str
    dtype: str = "float32"
    shape: list[int | None]


class ParityResult(BaseModel):
    """Outcome of running the exported ONNX model against PyTorch on held-out data."""

    passed: bool
    max_abs_diff: float
    tolerance: float
    batch_sizes: list[int]
    rows_checked: int


class ModelMetadata(BaseModel):
    """Everything known about one immutable model version."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: int = 0  # assigned by the registry on registration
    task: Task
    architecture: str = "mlp"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_names: list[str]
    class_labels: list[str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    """Non-scalar evaluation results, e.g. the confusion matrix."""
    data_fingerprint: str = ""
    dataset: str = ""
    parent_version: int | None = None
    parity: ParityResult | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    """The training configuration, enough to train the same model again on new data."""
    lineage: dict[str, Any] = Field(default_factory=dict)
    """How this version came to be: trigger, data window, champion and challenger scores."""
    categories: dict[str, list[str]] = Field(default_factory=dict)
    """Categorical feature -> the values its graph codes, in code order (``values[i]`` is code
    ``i + 1``; code 0 is unknown: any other value, a missing one). Features not named are numeric
    (modelloop/categorical.py)."""

    def class_labels_or_indices(self) -> list[str]:
        """A classifier's class labels; class indices as strings when the metadata has none."""
        if self.class_labels:
            return list(self.class_labels)
        spec = next((o for o in self.outputs if o.name == PROBABILITIES), None)
        n = spec.shape[-1] if spec is not None and isinstance(spec.shape[-1], int) else 0
        return [str(i) for i in range(n)]

    def answers_like(self, other: ModelMetadata) -> bool:
        """Whether ``other``'s predictions can be compared with this version's, request by
        request: the same task and the same classes in the same order (a shadowing challenger
        and its champion, serving/shadow.py and monitoring/live_gate.py)."""
        return (self.task, self.class_labels_or_indices()) == (other.task, other.class_labels_or_indices())

    @property
    def gate_metric(self) -> str | None:
        """What the champion/challenger gate judges this version by (``config["gate_metric"]``:
        ``modelloop train --gate-metric``, ``models import --gate-metric``): ``accuracy``,
        ``f1`` (macro), ``roc_auc``, ``pr_auc`` or ``r2``; None when it stored none."""
        value = self.config.get("gate_metric")
        return value if isinstance(value, str) else None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def categorical_features(self) -> list[str]:
        """The categorical features, in ``feature_names`` order."""
        return [f for f in self.feature_names if f in self.categories]

    @property
    def numeric_features(self) -> list[str]:
        """The numeric features, in ``feature_names`` order."""
        return [f for f in self.feature_names if f not in self.categories]

    @property
    def input_dims(self) -> tuple[int | None, ...]:
        """The input's axes after the batch axis: ``(n_features,)`` for rows of features,
        e.g. ``(1, 8, 8)`` for an image, ``(None, n_features)`` for a sequence of any length."""
        if not self.inputs or len(self.inputs[0].shape) <= 2:  # rows: the feature names count
            return (self.n_features,)
        return tuple(self.inputs[0].shape[1:])


def monitored_features(x: Any, dims: tuple[int | None, ...]) -> Any:
    """``[rows, n_features]`` values that monitoring sees for a model input ``x`` of shape
    ``[rows, *dims]``: the features of a row, the pixels of an image (flattened), the mean over
    time of each feature of a sequence (NaN steps skipped). The reference sample holds the same."""
    import warnings

    import numpy as np

    x = np.asarray(x)
    if x.ndim == 2:
        return x
    if len(dims) == 2 and dims[0] is None:  # [rows, time, features]
        with warnings.catch_warnings():  # a feature missing at every step stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, axis=1)
    return x.reshape(len(x), -1)


Mode = Literal["realtime", "batch", "shadow"]
"""How a prediction was made: a real-time request, a batch route's row, or a challenger's answer
to a copy of a real-time request (scored off the request path; not a prediction anyone got)."""
MODE_SHADOW: Final = "shadow"
Number = Annotated[float, Strict()]
"""A JSON number (an integer too); never a string or a boolean, which lax parsing would turn
into one (``"1.5"``, ``true``)."""
Count = Annotated[StrictInt, Field(ge=0)]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000)")  # PostgreSQL's text cannot hold it
    return value


Text = Annotated[StrictStr, AfterValidator(_no_nul),
                 Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]
"""A string the sidecar may store: without NUL (one in a request id made PostgreSQL refuse the
whole group of batches committed with it)."""


MAX_CATEGORY_CHARS = 1024
"""The longest categorical value an event may carry (a row is stored whole, per event)."""
Category = Annotated[StrictStr, Field(max_length=MAX_CATEGORY_CHARS), AfterValidator(_no_nul),
                     Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]
FeatureValue = Number | Category | None
"""One value of an event's row: a number or null (missing) for a numeric feature, a string (at
most ``MAX_CATEGORY_CHARS``, no NUL) or null for a categorical one (modelloop/categorical.py).
Which kind a position takes is the model version's to say: the sidecar checks it against
``ModelMetadata.categories``. A union of pydantic's own validators, so a row of numbers is
validated as fast as before (a Python validator per value took 30 times as long)."""


MAX_LATENCY_S = 86_400.0
"""An event's ``latency_s`` is at most a day: serving answers in milliseconds, and one 1e300
would make every latency quantile of the window meaningless."""


class PredictionEvent(BaseModel):
    """One predicted row, sent from serving to the sidecar off the request path."""

    request_id: Text = Field(min_length=1, max_length=200)
    timestamp: Number
    """Unix time (seconds) when the prediction was made."""
    model: Text = Field(min_length=1, max_length=200)
    version: StrictInt = Field(ge=1)
    mode: Mode = "realtime"
    features: list[FeatureValue]
    """Raw input features in the model's feature order; ``None`` stands for a missing value, a
    string is the value of a categorical feature."""
    prediction: Number
    """Class index for a classifier, the value for a regressor, the score for an anomaly model."""
    probabilities: list[Number] | None = None
    latency_s: Number = Field(ge=0, le=MAX_LATENCY_S)
    """Time the request spent in serving (queue wait and inference), at most a day."""

    @field_validator("timestamp", "prediction", "latency_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class EventBatch(BaseModel):
    """``POST /events`` one object per event: ``{"events": [PredictionEvent, ...]}``. No other
    key: a body is one form or the other, told apart by its first key."""

    model_config = ConfigDict(extra="forbid")

    events: list[PredictionEvent] = Field(min_length=1)


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None


MAX_AXIS = 2**31 - 1
"""The longest axis of a packed matrix: ``[2**63, 0]`` holds no bytes, yet its length does not fit
an index (``len()`` raised OverflowError, which reached the client as a 5xx)."""


class PackedMatrix(BaseModel):
    """A float matrix as the base64 of its little-endian bytes in row order: how serving sends
    the features and probabilities of its events. The body of 1024 events of 30 features took
    serving 0.74 ms to write with the numbers as JSON text, 0.12 ms packed. NaN stands for a
    missing value, as null does in the list form."""

    dtype: Literal["float32", "float64"]
    shape: tuple[Annotated[int, Field(ge=0, le=MAX_AXIS, strict=True)],
                 Annotated[int, Field(ge=0, le=MAX_AXIS, strict=True)]]
    """``[rows, values per row]``."""
    data: Annotated[bytes, BeforeValidator(_base64),
                    WithJsonSchema({"type": "string", "contentEncoding": "base64"})]
    """Standard base64 with padding; any other character is refused."""

    @model_validator(mode="after")
    def _size(self) -> PackedMatrix:
        need = self.shape[0] * self.shape[1] * (4 if self.dtype == "float32" else 8)
        if len(self.data) != need:
            raise ValueError(f"data holds {len(self.data)} bytes; shape {list(self.shape)} of "
                             f"{self.dtype} needs {need}")
        return self

    def __len__(self) -> int:
        return self.shape[0]

    def array(self) -> np.ndarray:
        """The matrix (a read-only view of the decoded bytes)."""
        import numpy as np

        return np.frombuffer(self.data, dtype="<f4" if self.dtype == "float32" else "<f8").reshape(self.shape)

    def rows(self) -> list[list[float | None]]:
        """The list form: one list per row, None for NaN."""
        return [[None if v != v else v for v in row] for row in self.array().tolist()]

    @staticmethod
    def pack(x: np.ndarray) -> dict[str, Any]:
        """The JSON form of a 2-D float32 or float64 array (others are sent as float64)."""
        import numpy as np

        dtype = "float32" if x.dtype == np.float32 else "float64"
        data = np.ascontiguousarray(x, dtype="<f4" if dtype == "float32" else "<f8")
        return {"dtype": dtype, "shape": list(data.shape), "data": base64.b64encode(data.data).decode("ascii")}


def _rows_of(values: list[Any] | PackedMatrix | None) -> list[Any] | None:
    return values.rows() if isinstance(values, PackedMatrix) else values


class EventColumns(BaseModel):
    """The events of some requests to one model version, column by column: what serving sends
    (one JSON array per column costs a fraction of one object per event to write and to read).

    Request ``i`` predicted ``rows[i]`` rows, whose request ids are ``<request_ids[i]>-<first_row[i]
    + k>``; row ``r`` of ``features``, ``prediction`` and ``probabilities`` is the ``r``-th row
    of the requests taken in order. Each row stands for one :class:`PredictionEvent`
    (:meth:`events` gives them)."""

    model: Text = Field(min_length=1, max_length=200)
    version: StrictInt = Field(ge=1)
    mode: Mode = "realtime"
    request_ids: list[Text] = Field(min_length=1)
    """The base id of each request (its rows' ids add ``-<row>``)."""
    first_row: list[Count]
    rows: list[Count]
    timestamp: list[Number]
    latency_s: list[Number]
    features: list[list[FeatureValue]] | PackedMatrix
    """Packed (numbers only), or one list per row; a model with categorical features sends lists,
    strings in its categorical positions."""
    prediction: list[Number]
    probabilities: list[list[Number]] | PackedMatrix | None = None
    seen: Count | None = None
    """Rows the model predicted that these events stand for: theirs and those of the same model
    that serving's sample left out since its previous group (serving/sampling.py); None: not
    said (every row was sent)."""
    share: Annotated[float, Strict(), Field(gt=0, le=1)] = 1.0
    """Share of the model's rows whose events serving sent while these were recorded (a power of
    two; :mod:`modelloop.sampling` says which)."""

    @field_validator("features", "probabilities", mode="before")
    @classmethod
    def _packed(cls, value: Any) -> Any:
        """An object is the packed form; its problems are reported as this field's."""
        if not isinstance(value, dict):
            return value
        try:
            return PackedMatrix.model_validate(value)
        except ValidationError as exc:
            raise ValueError("; ".join(
                ".".join(map(str, e["loc"])) + (": " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                for e in exc.errors(include_url=False))) from None

    @model_validator(mode="after")
    def _lengths(self) -> EventColumns:
        n = len(self.request_ids)
        for name in ("first_row", "rows", "timestamp", "latency_s"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {n} requests")
        # (a few C calls a column: a batch holds up to thousands of requests)
        if min(self.rows) < 1 or min(self.first_row) < 0:
            raise ValueError("rows must be >= 1 and first_row >= 0 for every request")
        lengths = list(map(len, self.request_ids))
        if min(lengths) < 1 or max(lengths) > 190:
            raise ValueError("request_ids must be 1 to 190 characters each")
        if not all(map(math.isfinite, self.timestamp)):
            raise ValueError("timestamp must be finite numbers")
        lat = self.latency_s
        late = None if all(map(math.isfinite, lat)) and min(lat) >= 0 and max(lat) <= MAX_LATENCY_S else next(
            i for i, v in enumerate(lat) if not 0 <= v <= MAX_LATENCY_S)
        if late is not None:  # NaN fails too
            raise ValueError(f"latency_s[{late}]: must be between 0 and {MAX_LATENCY_S:g} s, "
                             f"got {self.latency_s[late]:g}")
        total = sum(self.rows)
        for name in ("features", "prediction", "probabilities"):
            values = getattr(self, name)
            if values is not None and len(values) != total:
                raise ValueError(f"{name} has {len(values)} rows; the requests hold {total}")
        return self

    def row_ids(self) -> list[str]:
        """The request id of every row, in order."""
        if len(self.rows) == sum(self.rows):  # a row a request (1-row requests): one map
            return list(map("{}-{}".format, self.request_ids, self.first_row))
        return [f"{base}-{first + k}" for base, first, n in
                zip(self.request_ids, self.first_row, self.rows, strict=True) for k in range(n)]

    def events(self) -> list[PredictionEvent]:
        """One :class:`PredictionEvent` per row."""
        request = [i for i, n in enumerate(self.rows) for _ in range(n)]  # each row's request
        features, probabilities = _rows_of(self.features), _rows_of(self.probabilities)
        assert features is not None
        return [PredictionEvent(
            request_id=rid, timestamp=self.timestamp[i], model=self.model, version=self.version,
            mode=self.mode, features=features[r], prediction=self.prediction[r],
            probabilities=None if probabilities is None else probabilities[r],
            latency_s=self.latency_s[i]) for r, (rid, i) in enumerate(zip(self.row_ids(), request,
                                                                          strict=True))]


class ColumnBatch(BaseModel):
    """``POST /events`` in columns: ``{"columns": [EventColumns, ...]}`` and no other key."""

    model_config = ConfigDict(extra="forbid")

    columns: list[EventColumns] = Field(min_length=1)


class Feedback(BaseModel):
    """The true label of one earlier prediction."""

    request_id: Text = Field(min_length=1, max_length=200)
    label: StrictStr | StrictInt | Number
    """A class name or index, or a regression target: see the sidecar's ``resolve_label``."""
    timestamp: Number | None = None
    """When the label became known (unix seconds); the sidecar's clock when omitted."""

    @field_validator("label", mode="before")
    @classmethod
    def _label_kind(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a class name, a class index or a number, got "
                             f"{type(value).__name__}")
        return value
