"""MLflow in and out (docs/integrations.md, "MLflow"): a job's model may be an MLflow model URI on
the operator's tracking server (``mlflow_tracking_uri``), and its sanitized model goes back there.

In, at submit (the API): ``fetch_model`` takes ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``
(pinned to the version the alias names then) or ``runs:/RUN_ID/PATH``, finds the one model file
there and copies its bytes into the staged upload; it never loads a model. Only files the worker
reads without unpickling arbitrary objects are taken: TorchScript, safetensors, or a state_dict
(read with ``torch.load(weights_only=True)``). MLflow's pytorch flavor pickles the whole model by
default (``serialization_format="pickle"``) or stores a torch.export archive (``"pt2"``, whose
loading runs Python code too): such a model is refused, saying how to log it safely; a
TorchScript model logged with the flavor is taken.

Out, when the job's run has ended well (the worker): ``register_sanitized`` logs the sanitized
model, report.json and the trigger pictures to a new run, with the report's metrics and tags that
name the job, and, for a ``models:/`` source, registers the model as a new version of the same
registered model. Its outcome is stored with the job's result, whatever it is: a failure there
never fails the job.

mlflow is imported inside the functions: it is an optional extra (``baerase[mlflow]``) and takes
seconds to import.
"""

import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field

from app.core.config import Settings
from app.core.remote_inputs import FetchedInput, RemoteInputError, Sink
from worker.sanitize.errors import InputError, first_line
from worker.sanitize.formats import model_format
from worker.sanitize.report import Report

MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[\w-]+))/?")
RUNS_URI = re.compile(r"runs:/(?P<run_id>[0-9A-Za-z_-]+)(?:/(?P<path>.*))?")
# The files that can hold a model; anything else in a model's folder (MLmodel, conda.yaml,
# requirements.txt, a pickled python_model.pkl, ...) is metadata, never read as a model.
MODEL_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".pt2")
# An MLmodel file is a few hundred bytes of YAML.
MAX_MLMODEL_BYTES = 1024 * 1024
# Where the sanitized model, the report and the trigger pictures go in the new run.
SANITIZED_MODEL_PATH = "sanitized_model"
REPORT_PATH = "baerase"
# The experiment of the new run when the source has no run of its own.
DEFAULT_EXPERIMENT = "baerase"
HOW_TO_LOG_SAFELY = (
    "log the weights alone instead: a safetensors file (safetensors.torch.save_file(model.state_dict(), "
    "'model.safetensors')) or a TorchScript archive (torch.jit.save(torch.jit.script(model), 'model.pt')) "
    "with mlflow.log_artifact(path, 'weights'), or mlflow.pytorch.log_state_dict(model.state_dict(), "
    "'weights'), then register that folder: MlflowClient().create_model_version(NAME, "
    "f'runs:/{run_id}/weights', run_id); or log a TorchScript model with the pytorch flavor: "
    "mlflow.pytorch.log_model(torch.jit.script(model), name=..., serialization_format='pickle')")


class Registration(BaseModel):
    """Where the sanitized model of a job whose model came from MLflow went (jobs.model_registration)."""

    status: Literal["registered", "failed"]
    model_uri: str | None = Field(None, description="models:/NAME/VERSION of the new version, or "
                                  "runs:/RUN_ID/sanitized_model for a runs:/ source")
    run_id: str | None = Field(None, description="the MLflow run the sanitized model, report and "
                               "trigger pictures were logged to")
    error: str | None = Field(None, description="why it failed; the sanitized model stays downloadable")


@dataclass(frozen=True)
class MlflowSource:
    """A parsed ``models:/`` or ``runs:/`` URI."""

    registered_model: str | None = None  # models:/
    version: str | None = None  # models:/NAME/VERSION
    alias: str | None = None  # models:/NAME@ALIAS
    run_id: str | None = None  # runs:/
    path: str = ""  # runs:/RUN_ID/PATH, within the run's artifacts


def is_mlflow_uri(source: str | None) -> bool:
    """Whether a job's model_source is an MLflow model URI, whose sanitized model goes back there."""
    return source is not None and source.startswith(("models:/", "runs:/"))


def parse_source(uri: str) -> MlflowSource:
    if match := MODELS_URI.fullmatch(uri):
        return MlflowSource(registered_model=match["name"], version=match["version"], alias=match["alias"])
    if match := RUNS_URI.fullmatch(uri):
        path = "/".join(part for part in (match["path"] or "").split("/") if part)
        if {".", ".."} & set(path.split("/")):
            raise RemoteInputError(f"{uri}: the path in a runs:/ URI may not hold . or ..")
        return MlflowSource(run_id=match["run_id"], path=path)
    raise RemoteInputError(f"{uri} is not an MLflow model URI this service reads: give "
                           "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")


def mlflow_client(tracking_uri: str):
    # The service sends no usage data to mlflow.org on the operator's behalf; an operator who
    # wants MLflow's telemetry sets MLFLOW_DISABLE_TELEMETRY=false.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's own defaults (7 retries with backoff, 120 s a request) would hold a submit for many
    # minutes when the tracking server is down; the operator may still set these.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def tracking_uri_of(settings: Settings, uri: str) -> str:
    if not settings.mlflow_tracking_uri:
        raise RemoteInputError(f"{uri} is an MLflow model URI, but this service has no MLflow tracking "
                               "server: the operator must set BAERASE_MLFLOW_TRACKING_URI; or upload "
                               "the model file")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise RemoteInputError(f"{uri} is an MLflow model URI, but the service's MLflow client is not "
                               "installed: the operator must install baerase[mlflow]") from None
    return settings.mlflow_tracking_uri


@contextmanager
def mlflow_answers(uri: str):
    """MLflow's errors, as messages for the tenant."""
    from mlflow.exceptions import MlflowException, RestException

    try:
        yield
    except RestException as e:  # the tracking server's own answer: says what is missing or denied
        raise RemoteInputError(f"{uri}: the MLflow tracking server answered: {e.message}") from None
    except (MlflowException, OSError) as e:
        raise RemoteInputError(f"{uri}: cannot read it from the MLflow tracking server "
                               f"({type(e).__name__}: {first_line(e)})") from None


# In: the model of a job.

def fetch_model(uri: str, sink: Sink, settings: Settings) -> FetchedInput:
    """Copies the model file at ``uri`` into ``sink``; refuses pickled models. The source it
    returns is the URI pinned to a version (an alias resolved), for jobs.model_source."""
    tracking_uri = tracking_uri_of(settings, uri)
    source = parse_source(uri)
    client = mlflow_client(tracking_uri)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with mlflow_answers(uri), tempfile.TemporaryDirectory(prefix="baerase-mlflow-") as scratch:
        if source.registered_model is not None:
            version = (client.get_model_version_by_alias(source.registered_model, source.alias)
                       if source.alias else client.get_model_version(source.registered_model, source.version))
            pinned = f"models:/{source.registered_model}/{version.version}"
            root = client.get_model_version_download_uri(source.registered_model, version.version)
        else:
            client.get_run(source.run_id)  # a run that does not exist is named as such
            pinned = f"runs:/{source.run_id}/{source.path}".rstrip("/")
            root = pinned
        repo = get_artifact_repository(root, tracking_uri=tracking_uri)
        files = list_files(repo)
        if not files and (source.registered_model is not None or source.path):  # one file, or nothing
            parent, _, name = root.rstrip("/").rpartition("/")
            repo = get_artifact_repository(parent, tracking_uri=tracking_uri)
            files = {name: size for path, size in list_files(repo, recursive=False).items() if path == name}
        if not files:
            raise RemoteInputError(f"{pinned} holds no files; check the URI")
        path, pytorch_flavor = choose_model_file(pinned, files, repo, Path(scratch))
        sink.expect(files[path])
        local = Path(repo.download_artifacts(path, scratch))
        check_model_file(pinned, local, pytorch_flavor)
        with open(local, "rb") as file:
            sink.copy(file)
    return FetchedInput(PurePosixPath(path).name, pinned)


def list_files(repo, path: str | None = None, recursive: bool = True) -> dict[str, int | None]:
    """The files under ``path`` of an artifact repository, by their path in it, with their sizes."""
    files = {}
    for entry in repo.list_artifacts(path):
        if entry.is_dir:
            if recursive:
                files |= list_files(repo, entry.path)
        else:
            files[entry.path] = entry.file_size
    return files


def choose_model_file(uri: str, files: dict[str, int | None], repo, scratch: Path) -> tuple[str, bool]:
    """The path of the model file among ``files``, and whether MLflow's pytorch flavor wrote it
    (then it is a pickled whole model unless it is TorchScript)."""
    if "MLmodel" in files and (files["MLmodel"] or 0) <= MAX_MLMODEL_BYTES:
        import yaml

        mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", str(scratch))).read_text()) or {}
        pytorch = (mlmodel.get("flavors") or {}).get("pytorch")
        if isinstance(pytorch, dict):
            data = str(pytorch.get("model_data") or "data").strip("/")
            flavor_files = [path for path in files if path.startswith(f"{data}/") and path.endswith(MODEL_FILE_SUFFIXES)]
            if len(flavor_files) == 1:
                return flavor_files[0], True
    candidates = sorted(path for path in files if path.endswith(MODEL_FILE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0], False
    if not candidates:
        raise RemoteInputError(f"{uri} holds no model file (.safetensors, .pt or .pth); it has "
                               f"{', '.join(sorted(files)[:10])}; {HOW_TO_LOG_SAFELY}")
    raise RemoteInputError(f"{uri} holds {len(candidates)} model files ({', '.join(candidates[:10])}); "
                           "name one with runs:/RUN_ID/PATH/TO/FILE, or register a version that holds one")


def check_model_file(uri: str, path: Path, pytorch_flavor: bool) -> None:
    """Refuses a file the worker could only load by unpickling it; checks structure only."""
    try:
        kind = model_format(path, f"{uri} ({path.name})")
    except InputError as e:
        raise RemoteInputError(f"{e}; {HOW_TO_LOG_SAFELY}") from None
    if pytorch_flavor and kind != "torchscript":
        raise RemoteInputError(
            f"{uri} is a model logged with MLflow's pytorch flavor, which pickles the whole model "
            "(serialization_format='pickle'): loading it would run whatever code the pickle names, "
            f"so it is refused; {HOW_TO_LOG_SAFELY}")


# Out: the sanitized model of a succeeded job.

def register_sanitized(settings: Settings, source_uri: str, job_id: uuid.UUID, out_dir: Path,
                       model_file: Path, report: Report) -> Registration:
    """Logs the sanitized model, report.json and the trigger pictures in ``out_dir`` to a new run
    and, for a models:/ source, registers the model as a new version of that registered model.
    Never raises: a failure is returned, with what went wrong."""
    run_id = None
    client = None
    try:
        source = parse_source(source_uri)
        client = mlflow_client(tracking_uri_of(settings, source_uri))
        tags = job_tags(settings, job_id, source_uri, report)
        run_id = client.create_run(experiment_for(client, source), tags=tags,
                                   run_name=f"baerase-{job_id}").info.run_id
        client.log_batch(run_id, metrics=report_metrics(report))
        with tempfile.TemporaryDirectory(prefix="baerase-mlflow-") as folder:
            # Logged as model.<ext> whatever the engine called it: a name users can rely on.
            shutil.copyfile(model_file, Path(folder) / f"model{model_file.suffix}")
            client.log_artifacts(run_id, folder, SANITIZED_MODEL_PATH)
        client.log_artifact(run_id, str(out_dir / "report.json"), REPORT_PATH)
        if report.triggers:
            client.log_artifacts(run_id, str(out_dir / "triggers"), f"{REPORT_PATH}/triggers")
        client.set_terminated(run_id, "FINISHED")
        model_uri = f"runs:/{run_id}/{SANITIZED_MODEL_PATH}"
        if source.registered_model is not None:
            version = client.create_model_version(
                source.registered_model, model_uri, run_id=run_id, tags=tags,
                description=f"Sanitized by baerase job {job_id} from {source_uri}: {report.verdict}. "
                            f"{report.verdict_reason}")
            model_uri = f"models:/{source.registered_model}/{version.version}"
        return Registration(status="registered", model_uri=model_uri, run_id=run_id)
    except Exception as e:  # noqa: BLE001 - the job has succeeded whatever happens here
        if run_id is not None:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the error that matters is the first
                pass
        return Registration(status="failed", run_id=run_id, error=f"{type(e).__name__}: {first_line(e, 1000)}")


def experiment_for(client, source: MlflowSource) -> str:
    """The experiment of the source's run, so that the sanitized model sits beside it; else
    DEFAULT_EXPERIMENT, made on first use."""
    run_id = source.run_id
    if source.registered_model is not None:  # jobs.model_source names the version, never an alias
        run_id = client.get_model_version(source.registered_model, source.version).run_id
    if run_id:
        return client.get_run(run_id).info.experiment_id
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return experiment.experiment_id if experiment else client.create_experiment(DEFAULT_EXPERIMENT)


def job_tags(settings: Settings, job_id: uuid.UUID, source_uri: str, report: Report) -> dict[str, str]:
    """Tags of the new run and model version that lead back to the job."""
    tags = {"baerase.job_id": str(job_id), "baerase.source": source_uri, "baerase.verdict": report.verdict,
            "baerase.engine_version": report.versions.get("baerase", "")}
    if settings.public_url:
        tags["baerase.job_url"] = f"{settings.public_url.rstrip('/')}/jobs/{job_id}"
    return tags


def report_metrics(report: Report) -> list:
    """The report's headline numbers as MLflow metrics (the verdict is a tag: metrics are numbers)."""
    from mlflow.entities import Metric

    values = {
        "clean_accuracy_before": report.clean_accuracy.before,
        "clean_accuracy_after": report.clean_accuracy.after,
        "backdoor_probability": report.backdoor_probability,
        "backdoor_detected": float(report.backdoor_detected),
        "detected_targets": float(len(report.detected_targets)),
        "residual_targets": float(len(report.residual_targets)),
        "model_changed": float(report.model_changed),
        "run_time_s": report.timings_s.get("total", 0.0),
    }
    if report.clean_accuracy.margin is not None:  # reports of older versions lack it
        values["clean_accuracy_margin"] = report.clean_accuracy.margin
    for target, asr in report.recovered_asr.items():
        values[f"recovered_asr_before.class_{target}"] = asr.before
        values[f"recovered_asr_after.class_{target}"] = asr.after
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in values.items()]
