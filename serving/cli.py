"""``modelloop serve``, ``modelloop batch score`` and ``batch explain``: settings in, library call out.

``serve_app`` starts the BentoML service ``serving.service:ModelService``; its options override the
``MODELLOOP_SERVING_*`` settings and reach BentoML's worker processes as those environment
variables. ``batch_app`` scores CSV/Parquet files in bounded memory, resumably.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from modelloop.registry import Registry, RegistryError
from modelloop.settings import is_loopback
from serving.settings import NanPolicy, Provider, ServingSettings

logger = logging.getLogger(__name__)
console = Console(stderr=True)

serve_app = typer.Typer(add_completion=False)
batch_app = typer.Typer(help="Score CSV/Parquet files with the served model, in bounded memory.",
                        no_args_is_help=True, add_completion=False)


# the options batch score and batch explain share
InputArgument = Annotated[Path, typer.Argument(metavar="IN", help="Input .csv or .parquet with the model's feature columns.")]
ModelOption = Annotated[str | None, typer.Option("--name", "-n", help="Registered model (default: the only one).")]
KeepOption = Annotated[list[str] | None, typer.Option("--keep", "-k", help="Input column to copy to the output (repeatable), e.g. an id.")]
NanOption = Annotated[NanPolicy | None, typer.Option(help="Missing values: allow or reject.")]


@batch_app.callback()
def _batch() -> None:
    """Score CSV/Parquet files with a registered model, in bounded memory and resumably."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    # one line, printed as it is (a library's message may hold newlines or look like markup)
    console.print(f"[red]error:[/] {escape(' '.join(message.splitlines()))}", highlight=False,
                  soft_wrap=True)
    return typer.Exit(code=code)


def _settings(**overrides: Any) -> ServingSettings:
    try:
        return ServingSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic names the setting and the problem
        raise _fail(str(exc).replace("\n", " ")) from exc


@serve_app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 3000).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 0.0.0.0).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="Port of the Open Inference Protocol over gRPC (default 0: off).")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="The default model, which /predict serves (default: the only one).")] = None,
    models: Annotated[str | None, typer.Option(help="Models served, names or globs, comma-separated (default: every registered model).")] = None,
    max_loaded_models: Annotated[int | None, typer.Option(help="Most models loaded per worker; the least recently used is unloaded (0 = no limit).")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias or version to serve and follow (default production).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0 = one per core).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads per worker (0 = cores/workers).")] = None,
    providers: Annotated[Provider | None, typer.Option(help="Execution provider (auto picks a GPU when usable).")] = None,
    batching: Annotated[bool | None, typer.Option("--batching/--no-batching", help="Merge concurrent requests into one ONNX Runtime call.")] = None,
    max_batch_rows: Annotated[int | None, typer.Option(help="Most rows per ONNX Runtime call.")] = None,
    max_batch_wait_s: Annotated[float | None, typer.Option(help="Longest wait for a fuller batch (seconds).")] = None,
    max_queue_rows: Annotated[int | None, typer.Option(help="Queued rows per worker before shedding with 503.")] = None,
    sidecar_url: Annotated[str | None, typer.Option(help="Monitoring sidecar base URL for prediction events.")] = None,
    nan_policy: Annotated[NanPolicy | None, typer.Option(help="Missing values: allow (the graph imputes) or reject.")] = None,
    fast_path: Annotated[bool | None, typer.Option("--fast-path/--no-fast-path", help="Serve prediction routes in front of BentoML's middleware.")] = None,
) -> None:
    """Serve the registry's models (each at its production version; --name the default one, which
    /predict serves) over REST: /predict, /models/NAME/predict, Open Inference Protocol v2 (/v2/...),
    batch scoring (/batch/...), /metrics and health routes, as a BentoML service on ONNX Runtime;
    with --grpc-port, the Open Inference Protocol over gRPC too.

    Every option has an environment variable MODELLOOP_SERVING_<OPTION>; see docs/serving.md. The
    model swaps without downtime when its alias moves (modelloop models promote NAME VERSION) to
    a version that passes its check; a broken model stops start-up with one line naming the file
    and why.

    Keys come from the environment only: MODELLOOP_SERVING_API_KEY is the bearer key clients
    send to the prediction, batch and admin routes (health and /metrics stay open; without it,
    listening beyond loopback logs a warning), and MODELLOOP_SERVING_SIDECAR_KEY is sent with
    the prediction events to the sidecar (its MODELLOOP_MONITOR_INGEST_KEY).
    """
    settings = _settings(port=port, host=host, grpc_port=grpc_port, model=name, models=models,
                         max_loaded_models=max_loaded_models, alias=alias, workers=workers,
                         threads=threads, providers=providers, batching=batching,
                         max_batch_rows=max_batch_rows, max_batch_wait_s=max_batch_wait_s,
                         max_queue_rows=max_queue_rows, sidecar_url=sidecar_url,
                         nan_policy=nan_policy, fast_path=fast_path)
    if settings.api_key is None and not is_loopback(settings.host):
        logger.warning("no MODELLOOP_SERVING_API_KEY: the prediction, batch and admin routes are "
                       "open to anyone who reaches %s:%d; set it unless a gateway in front "
                       "authenticates (or listen on 127.0.0.1 with --host)",
                       settings.host, settings.port)
    _preflight(settings)
    os.environ.update(settings.to_env())  # BentoML's workers build their settings from these
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from our servers
    from serving.service import ModelService, startup_failure_file, unloaded_models_file

    metrics_dir = _own_metrics_dir(settings)
    failure = startup_failure_file(os.getpid())
    failure.unlink(missing_ok=True)  # a former process's with our pid
    unloaded = unloaded_models_file(os.getpid())
    unloaded.unlink(missing_ok=True)
    service: Any = ModelService  # a bentoml Service (its decorator's typing hides that)
    service.config["workers"] = settings.worker_count()
    logger.info("starting BentoML on %s:%d with %d workers%s", settings.host, settings.port,
                settings.worker_count(), f", gRPC on port {settings.grpc_port}" if settings.grpc_port else "")
    try:
        service.serve_http(host=settings.host, port=settings.port)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        unloaded.unlink(missing_ok=True)
    if failure.exists():  # a worker could not load the model and stopped the server
        reason = failure.read_text()
        failure.unlink(missing_ok=True)
        raise _fail(reason)


def _own_metrics_dir(settings: ServingSettings) -> Path:
    """Give this server its own Prometheus multiprocess directory, new at each start, on local
    disk. BentoML keeps one under BENTOML_HOME and empties it when a server starts, so a second
    server on the host wiped the first one's metric files and the two then reported each
    other's requests (and pods sharing a volume for their home would do the same)."""
    import re
    import tempfile

    from bentoml._internal.configuration.containers import BentoMLContainer

    name = f"{re.sub(r'[^A-Za-z0-9.]+', '_', settings.host)}-{settings.port}"
    path = Path(tempfile.mkdtemp(prefix=f"modelloop-metrics-{name}-"))
    BentoMLContainer.prometheus_multiproc_dir.set(str(path))
    logger.info("metrics of this server's workers in %s", path)
    return path


def _preflight(settings: ServingSettings) -> None:
    """Load and check the model once here (as each worker will), so a bad model stops start-up
    with one clear line naming the file and why (BentoML would otherwise restart failing workers
    forever)."""
    from serving.models import load_checked, runtime_factory
    from serving.repository import default_model, served_names
    from serving.runtime import ModelLoadError

    registry = Registry(settings.registry_dir)
    names = served_names(registry, settings)
    name = default_model(names, settings)
    url = f"http://{settings.host}:{settings.port}"
    if not names:
        raise _fail(f"no model to serve: none registered under {registry.root} matches "
                    f"MODELLOOP_SERVING_MODELS={settings.models!r}")
    if name is None:  # several models and no default: each loads on its first request
        console.print(f"serving {', '.join(names)} ({settings.alias}; no default model for /predict: "
                      f"set MODELLOOP_SERVING_MODEL), {url}", highlight=False, soft_wrap=True)
        return
    try:
        runtime = load_checked(runtime_factory(settings), registry.get(name, settings.alias))
    except (ModelLoadError, RegistryError) as exc:
        raise _fail(str(exc)) from exc
    others = f" (and {', '.join(n for n in names if n != name)} on request)" if len(names) > 1 else ""
    console.print(f"serving {name} v{runtime.model_version} ({settings.alias}) on "
                  f"{runtime.active_provider}{others}, {url}", highlight=False, soft_wrap=True)
    runtime.unload()
    del runtime
    gc.collect()


@batch_app.command("score")
def score(
    input_path: InputArgument,
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Output .csv or .parquet: kept columns, prediction, label, probability_<label>.")],
    name: ModelOption = None,
    alias: Annotated[str | None, typer.Option(help="Alias or version to score with (default production).")] = None,
    chunk_rows: Annotated[int | None, typer.Option(help="Rows per chunk (bounds memory; default 65536).")] = None,
    keep: KeepOption = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (0 = all cores).")] = None,
    providers: Annotated[Provider | None, typer.Option(help="Execution provider.")] = None,
    nan_policy: NanOption = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard the parts of an interrupted run instead of resuming it.")] = False,
) -> None:
    """Score IN into OUT chunk by chunk with ONNX Runtime: bounded memory, a progress bar, the
    same results as POST /predict. An interrupted run resumes where it stopped when the same
    command is run again (the chunks done are kept in OUT.parts/)."""
    from serving.batch import (
        BatchInputError,
        parts_dir,
        resumable_version,
        reuse_freed_memory,
        score_file,
        warm_arrow_numpy_bridge,
    )
    from serving.models import resolve_model_name
    from serving.runtime import ModelLoadError, OnnxRuntime

    reuse_freed_memory()  # this process only scores: chunk buffers are reused, not re-faulted
    warm_arrow_numpy_bridge()  # overlaps the model's load

    settings = _settings(model=name, alias=alias, chunk_rows=chunk_rows, threads=threads,
                         providers=providers, nan_policy=nan_policy)
    keep = keep or []
    registry = Registry(settings.registry_dir)
    try:
        model = resolve_model_name(registry, settings.model)
        if restart and parts_dir(output).exists():
            shutil.rmtree(parts_dir(output))
        version = resumable_version(input_path, output, model, settings.chunk_rows, keep)
        if version is not None:
            console.print(f"resuming the interrupted run of {output} with {model} v{version}", soft_wrap=True)
        ref = version if version is not None else settings.alias
        # warmed up at the chunk size too, so ONNX Runtime sizes its memory arena once, up front
        runtime = OnnxRuntime(registry.get(model, ref), provider=settings.providers,
                              threads=settings.threads or (os.cpu_count() or 1),
                              io_binding=settings.io_binding, device_id=settings.device_id,
                              warmup_rows=(1, settings.chunk_rows)).load()
        report = _score_with_progress(score_file, input_path, output, runtime, settings, keep)
    except (BatchInputError, ModelLoadError, RegistryError) as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"scored {report.rows} rows of {input_path} with {report.model} v{report.version} on "
        f"{runtime.active_provider} into "
        f"{output} in {report.seconds:.1f} s ({report.rows_per_s:,.0f} rows/s"
        + (f"; {report.resumed_chunks} of {report.chunks} chunks resumed" if report.resumed_chunks else "")
        + ")", highlight=False, soft_wrap=True)


def _score_with_progress(score_file: Any, input_path: Path, output: Path, runtime: Any,
                         settings: ServingSettings, keep: list[str]) -> Any:
    from serving.batch import InputFile, check_columns

    src = InputFile.open(input_path)
    check_columns(src, runtime.metadata.feature_names, keep)  # before the progress bar appears
    with _progress("scoring", src) as update:
        return score_file(input_path, output, runtime, chunk_rows=settings.chunk_rows,
                          nan_policy=settings.nan_policy, keep=keep, progress=update)


@contextlib.contextmanager
def _progress(verb: str, src: Any) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over the input file ``src`` (an InputFile): in rows for Parquet, in bytes
    for CSV; yields ``update(rows, done)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total = src.total_rows if src.total_rows is not None else src.size
    unit = "rows" if src.total_rows is not None else "bytes"
    columns = [TextColumn(f"[bold]{verb}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TextColumn("{task.fields[rows]:,} rows"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(verb, total=total, rows=0)
        yield lambda rows, done: bar.update(task, completed=done, rows=rows)


@batch_app.command("explain")
def explain(
    input_path: InputArgument,
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Output .csv or .parquet: kept columns; per explained output its value, <output>__base and <output>__<feature> attributions; additivity_error.")],
    name: ModelOption = None,
    alias: Annotated[str | None, typer.Option(help="Alias or version to explain (default production).")] = None,
    keep: KeepOption = None,
    max_evals: Annotated[int | None, typer.Option(help="Most model evaluations per row (default MODELLOOP_SERVING_EXPLAIN_MAX_EVALS).")] = None,
    background_rows: Annotated[int | None, typer.Option(help="Reference rows masked features are drawn from (default 100).")] = None,
    nan_policy: NanOption = None,
) -> None:
    """Explain every row of IN into OUT: per-feature SHAP attributions (permutation, on the
    version's ONNX graph, against a background from its reference sample), the same as POST
    /explain, with a progress bar. Rows are explained 64 at a time; each costs at most
    --max-evals model evaluations."""
    from serving.batch import BatchInputError, InputFile, check_columns
    from serving.explain import explain_file
    from serving.models import resolve_model_name
    from serving.runtime import ModelLoadError, OnnxRuntime

    settings = _settings(model=name, alias=alias, nan_policy=nan_policy, explain_max_evals=max_evals,
                         explain_background_rows=background_rows)
    registry = Registry(settings.registry_dir)
    try:
        model = resolve_model_name(registry, settings.model)
        runtime = OnnxRuntime(registry.get(model, settings.alias), provider=settings.providers,
                              threads=settings.threads or (os.cpu_count() or 1)).load()
        src = InputFile.open(input_path)
        check_columns(src, runtime.metadata.feature_names, keep or [])  # before the progress bar
        with _progress("explaining", src) as update:
            rows, seconds = explain_file(input_path, output, runtime, background=settings.explain_background_rows,
                                         max_evals=settings.explain_max_evals, nan_policy=settings.nan_policy,
                                         keep=keep or [], progress=update)
    except BatchInputError as exc:  # the input (or the version's reference sample) is at fault
        raise _fail(str(exc), code=2) from exc
    except (ModelLoadError, RegistryError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"explained {rows} rows of {input_path} with {model} v{runtime.model_version} into "
                  f"{output} in {seconds:.1f} s ({seconds / max(rows, 1) * 1e3:.1f} ms a row)",
                  highlight=False, soft_wrap=True)
