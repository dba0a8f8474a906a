"""Settings of the serving process (env prefix ``MODELLOOP_SERVING_``).

Built once per process in the entry point (the BentoML worker in ``serving/service.py``, the
``modelloop batch`` command) and passed down::

    settings = ServingSettings()                  # reads MODELLOOP_SERVING_* and MODELLOOP_HOME
    settings = ServingSettings(model="churn", workers=2)

``modelloop serve`` turns its options into these environment variables for BentoML's worker
processes (:meth:`ServingSettings.to_env`), so ``bentoml serve serving.service:ModelService``
with the same environment serves the same way.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

from pydantic import (
    Field,
    HttpUrl,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
)
from pydantic_settings import SettingsConfigDict

from modelloop.schemas import ALIAS_PRODUCTION
from modelloop.settings import HomeSettings

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]
NanPolicy = Literal["allow", "reject"]
Share = Annotated[float, Field(gt=0, le=1)]
ENV_PREFIX = "MODELLOOP_SERVING_"


class ServingSettings(HomeSettings):
    """Settings of ``modelloop serve`` (the BentoML service) and ``modelloop batch score``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    # -- which model -----------------------------------------------------------------------------
    model: str | None = None
    """The default model: the one ``/predict`` and the batch routes serve (it loads at start-up,
    which fails when it cannot). None: the only model served, if there is only one."""

    models: str = "*"
    """The registered models served (``/v2/models/{name}/...``, ``/models/{name}/predict``):
    names or globs, comma-separated (``churn,fraud``, ``fraud-*``); every registered model by
    default. Each loads on its first request."""

    max_loaded_models: NonNegativeInt = 0
    """Most models a worker keeps loaded; beyond it the least recently used one is unloaded
    (after its requests in flight) and loads again on its next request. 0: no limit."""

    alias: str = ALIAS_PRODUCTION
    """Alias (or version number) to serve and follow; a change of the alias swaps the model."""

    alias_poll_interval_s: PositiveFloat = 2.0
    """How often each worker checks whether the alias points at another version."""

    shadow: bool = True
    """Score a copy of each model's real-time traffic with the version its ``challenger`` alias
    names, off the request path, and send its answers to the sidecar as shadow events
    (serving/shadow.py; needs ``sidecar_url``). Off: the alias is ignored."""

    shadow_share: Share = 1.0
    """Share of the real-time rows the challenger scores (rounded down to a power of two, as
    the event sample's shares are): the rows whose request id scores below it by the event
    sample's rule (modelloop/sampling.py), so a request is shadowed on every worker or on none,
    and never one whose production event the sample leaves out. Requests marked as to be
    labelled (``X-Modelloop-Label-Expected: 1``) are always shadowed. On two busy cores, scoring every
    row cost the champion 4-24% of its requests a second in the runs of BENCHMARKS.md; the live
    gate needs labelled rows scored by both, not every row."""

    shadow_queue_rows: PositiveInt = 4096
    """Rows of production batches waiting for the challenger at most; a batch beyond it is not
    shadowed (counted as dropped), so the shadow gives way first under load."""

    # -- ONNX Runtime ------------------------------------------------------------------------------
    providers: Provider = "auto"
    """Execution provider: ``auto`` takes TensorRT or CUDA when a GPU is usable, else the CPU;
    ``cuda``/``tensorrt`` fail the load when that provider does not become active."""

    threads: NonNegativeInt = 0
    """ONNX Runtime intra-op threads per worker; 0 sizes them to cores / workers (at least 1)."""

    io_binding: Literal["auto", "on", "off"] = "auto"
    """Run through ONNX Runtime's IO binding: ``auto`` uses it on GPU providers only."""

    device_id: NonNegativeInt = 0
    """GPU index for the CUDA/TensorRT providers."""

    # -- HTTP server -------------------------------------------------------------------------------
    host: str = "0.0.0.0"
    """Address ``modelloop serve`` listens on."""

    port: int = Field(default=3000, ge=0, le=65535)
    """Port ``modelloop serve`` listens on."""

    workers: NonNegativeInt = 0
    """BentoML worker processes; 0 means one per CPU core."""

    grpc_port: int = Field(default=0, ge=0, le=65535)
    """Port of the Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) on
    ``host``; 0 turns it off. Every worker listens on it (``SO_REUSEPORT``)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the ``serving`` loggers (model loads, swaps, dropped events, failures)."""

    gc_threshold: PositiveInt = 50_000
    """Allocations between two young-generation garbage collections in a worker (Python's
    default is 700, which costs a small-model request about a tenth of its CPU)."""

    fast_path: bool = True
    """Serve the prediction routes in front of BentoML's HTTP middleware (OpenTelemetry tracing,
    BentoML's per-request metrics, access log), which costs about 3/4 of the throughput of a small
    model (see docs/serving.md). Off: they are mounted inside BentoML's app and pass through it."""

    # -- batching and load shedding ----------------------------------------------------------------
    batching: bool = True
    """Merge concurrent requests into one ONNX Runtime call; off runs each request alone."""

    max_batch_rows: PositiveInt = 256
    """Most rows merged into one ONNX Runtime call (one request larger than this runs alone)."""

    max_batch_wait_s: NonNegativeFloat = 0.0
    """Longest a batch waits for more requests while they keep arriving (it stops at the first
    short gap). 0 batches only what queued up while the previous batch ran, which adds no latency;
    a few milliseconds fill larger batches for heavy models under load."""

    max_queue_rows: PositiveInt = 16384
    """Rows a worker may hold waiting for the model; beyond it requests are shed at once with
    503 and ``Retry-After`` instead of queueing without bound."""

    inline_below_s: NonNegativeFloat = 0.0005
    """A batch the model runs faster than this, as timed at warm-up, runs on the event loop; a
    slower one on a thread, so the loop keeps reading requests meanwhile, as does every batch of
    a model whose full batch takes 8 times this (serving/batcher.py ``HEAVY_BATCHES``)."""

    # -- request limits and validation -------------------------------------------------------------
    max_rows_per_request: PositiveInt = 10000
    """Most instances in one request (more gets 413)."""

    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    """Largest request body (more gets 413), for JSON and uploaded files alike."""

    max_upload_bytes: PositiveInt = 2 * 1024 * 1024 * 1024
    """Largest file accepted by the asynchronous batch job API (streamed to disk)."""

    nan_policy: NanPolicy = "allow"
    """``allow`` passes missing values (JSON null, empty CSV cells) to the model, whose graph
    imputes them; ``reject`` answers 422 naming the field. Infinity is always rejected."""

    unknown_categories: Literal["allow", "reject"] = "allow"
    """A categorical value the model's vocabulary does not hold: ``allow`` answers with the
    graph's unknown code (and counts it in ``modelloop_unknown_category_total``); ``reject``
    answers 422 naming the field and the value."""

    api_key: SecretStr | None = None
    """Bearer token required on prediction and admin routes; None disables auth. Health routes
    and ``/metrics`` stay open."""

    # -- prediction events to the monitoring sidecar -----------------------------------------------
    sidecar_url: HttpUrl | None = None
    """Base URL of the monitoring sidecar (events go to ``{url}/events``); None sends no events."""

    sidecar_key: SecretStr | None = None
    """The sidecar's ingest key (the sidecar's ``MODELLOOP_MONITOR_INGEST_KEY``), sent as
    ``Authorization: Bearer <key>`` with every POST of events; None sends no key. Set it in the
    environment only: a command line is visible to every user of the host (``ps``)."""

    event_buffer_rows: PositiveInt = 250_000
    """Events a worker holds for sending, the batch being sent included. While the sidecar is
    away they wait here; when it is full, the oldest are dropped (and counted) to make room.
    An event takes a few hundred bytes; the default is sized to hold a 30 s outage at a
    worker's full one-row load (BENCHMARKS.md, events through a sidecar outage)."""

    event_batch_size: PositiveInt = 1000
    """Most events in one POST to the sidecar."""

    event_flush_interval_s: PositiveFloat = 0.5
    """Longest an event waits in the buffer before it is sent."""

    event_retry_backoff_s: PositiveFloat = 0.2
    """Wait after a first failed send (refused connection, timeout, 5xx, 408, 429); it doubles
    with each failure in a row up to ``event_retry_backoff_max_s``, and each wait is drawn between
    half and all of it (jitter). A failed batch is sent again until it goes through, the buffer
    needs its room or it is older than ``event_max_age_s``."""

    event_retry_backoff_max_s: PositiveFloat = 2.0
    """Longest wait between two sends while the sidecar is away, unless its ``Retry-After``
    asks for longer."""

    event_max_age_s: PositiveFloat = 600.0
    """Events not yet delivered this long after they were recorded are dropped (and counted)."""

    event_timeout_s: PositiveFloat = 2.0
    """HTTP timeout of one send to the sidecar."""

    event_max_body_bytes: PositiveInt = 16 * 1024 * 1024
    """Largest body of one send to the sidecar: a flight over it is sent in parts (a segment cut
    in halves where needed), so no event is refused for size. Keep it under the sidecar's
    ``MODELLOOP_MONITOR_MAX_BODY_BYTES`` (32 MiB by default)."""

    event_share: Share = 1.0
    """Share of each model's rows whose events are sent (rounded down to a power of two): a
    uniform sample by a hash of the request id (serving/sampling.py), which the sidecar uses to
    answer feedback for a request left out as ``not_sampled``. Requests sent with
    ``X-Modelloop-Label-Expected: 1`` keep all their rows. 1 sends every event."""

    event_shares: dict[str, Share] = Field(default_factory=dict)
    """Per-model :attr:`event_share`, JSON ``{"model": share}``, instead of the default."""

    event_rows_per_s: NonNegativeFloat = 0.0
    """Most events a second per model, all workers together (each worker sends its part): the
    share falls (by powers of two, measured each second) while more rows are predicted, so
    1024-row traffic does not fill the buffer. 0: no budget, only :attr:`event_share`."""

    event_rows_per_s_by_model: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Per-model :attr:`event_rows_per_s`, JSON ``{"model": rows}``, instead of the default."""

    # -- batch scoring -----------------------------------------------------------------------------
    chunk_rows: PositiveInt = 65536
    """Rows read, scored and written at a time by batch scoring (bounds its memory)."""

    sync_batch_max_rows: PositiveInt = 100_000
    """Files up to this many rows are scored synchronously by ``POST /batch/score``; larger ones
    must go through the job API (``POST /batch/jobs``). A Parquet file's rows are read from its
    footer, before anything is decoded."""

    sync_batch_max_decoded_bytes: PositiveInt = 256 * 1024 * 1024
    """Most bytes the feature columns of a Parquet file sent to ``POST /batch/score`` may decode
    to, as its footer declares (per column chunk the larger of its uncompressed size and 8 bytes
    a row), checked before anything is decoded: a file of a megabyte can declare gigabytes.
    More gets 413."""

    job_max_row_group_bytes: PositiveInt = 1024 * 1024 * 1024
    """Most bytes one row group of a batch job's Parquet file may decode to in its feature
    columns, as the footer declares (a job decodes one row group at a time); a job with a larger
    one fails naming it, before anything is decoded."""

    max_active_jobs: PositiveInt = 4
    """Most batch jobs uploading, queued or running at once, all workers of this home together;
    more get 429 with ``Retry-After``."""

    max_jobs_disk_bytes: PositiveInt = 10 * 1024 * 1024 * 1024
    """Most bytes the batch jobs' files (uploads, results, parts of running jobs) may take on
    disk; while they take this much a new job gets 507 with ``Retry-After`` (until finished jobs
    are deleted or expire), and an upload that fills it is cut off with 507."""

    job_retention_s: PositiveFloat = 86400.0
    """Finished batch jobs (their status and result) older than this are deleted when a new job
    is submitted."""

    # -- explanations (serving/explain.py) ---------------------------------------------------------
    explain_max_evals: PositiveInt = 200_000
    """Most model evaluations (rows run through the graph) one ``/explain`` request may take:
    instances x permutations x (2 x features + 1) masked inputs x background rows. Each instance
    gets up to 10 permutations within it; a request that cannot get one each gets 413."""

    explain_background_rows: PositiveInt = 100
    """Rows of the version's reference sample that masked features are drawn from (a seeded
    draw); the base value is the model's mean output over them."""

    explain_max_pending: PositiveInt = 8
    """Explanations waiting for a worker's explanation process at most (it runs one at a time);
    more get 503 with ``Retry-After``."""

    explain_nice: int = Field(default=19, ge=0, le=19)
    """Niceness of the explanation process: the kernel gives the serving worker the CPU first
    when both want it (19: explanations take only what the worker leaves; 0: an equal share)."""

    @property
    def jobs_dir(self) -> os.PathLike[str]:
        """Where asynchronous batch jobs keep their files, ``$MODELLOOP_HOME/serving/jobs``."""
        return self.home / "serving" / "jobs"

    def worker_count(self) -> int:
        """Worker processes to start: ``workers`` or the number of CPU cores."""
        return self.workers or (os.cpu_count() or 1)

    def ort_threads(self) -> int:
        """ONNX Runtime intra-op threads per worker: ``threads`` or cores / workers."""
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.worker_count())

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for the worker processes BentoML starts."""
        env = {"MODELLOOP_HOME": str(self.home)}
        for name in type(self).model_fields:
            if name == "home":
                continue
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, dict):
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env
