"""What a model version is, by content: the sha256 over every file stored at its location.

Evidence names the digest of the files it was measured on; the gate hashes the
stored files again when the evidence is attached and at every promotion, so a
weight file rewritten after signing is caught. Reading a location needs no
torch: files are listed and read through MLflow's artifact repositories.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from mlflow_tabcons.errors import TabconsInputError

# `mlflow server` proxies mlflow-artifacts:/ URIs to this destination (mlflow.server.ARTIFACTS_DESTINATION_ENV_VAR).
SERVER_ARTIFACTS_DESTINATION_ENV = "_MLFLOW_SERVER_ARTIFACT_DESTINATION"
_CHUNK = 1 << 20
# Loading ``models:/name/version`` from a local artifact store makes MLflow write this file (the name and version,
# never read back) into the stored model directory: hashing it would let a mere load break the evidence's binding.
REGISTERED_MODEL_META = "registered_model_meta"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(root: str | os.PathLike[str]) -> str:
    """``sha256:`` over the sorted (relative path, file sha256) pairs of every file under ``root``.

    Every file counts except MLflow's own ``registered_model_meta`` at the top, which no loader reads.

    A link to a directory is refused: its files would be read when the model loads but never hashed, so they
    could be rewritten after signing. (A link to a file is hashed as the file it points to, on every check.)
    """
    root = Path(root)
    linked = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() and p.is_dir())
    if linked:
        raise TabconsInputError(
            f"the model files at {root} link to directories ({', '.join(linked)}): files behind a link are not bound "
            "to the evidence; store the files themselves"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != root / REGISTERED_MODEL_META)
    if not files:
        raise TabconsInputError(f"no model files at {root}")
    listing = "".join(f"{p.relative_to(root).as_posix()}\0{_file_digest(p)}\n" for p in files)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def _server_side(location: str) -> str:
    """An ``mlflow-artifacts:`` location as the server's own destination URI when running inside `mlflow server`."""
    parsed = urllib.parse.urlparse(location)
    destination = os.environ.get(SERVER_ARTIFACTS_DESTINATION_ENV)
    if parsed.scheme != "mlflow-artifacts" or not destination:
        return location
    return destination.rstrip("/") + "/" + parsed.path.lstrip("/")


def content_digest(location: str) -> str:
    """The digest of the model files stored at ``location`` (any artifact URI MLflow can read)."""
    if not location:
        raise TabconsInputError("the model version has no storage location to read its files from")
    location = _server_side(location)
    try:
        repository = get_artifact_repository(location)
        if isinstance(repository, LocalArtifactRepository):
            return directory_digest(repository.artifact_dir)
        with tempfile.TemporaryDirectory() as folder:
            return directory_digest(repository.download_artifacts("", dst_path=folder))
    except (MlflowException, OSError) as error:
        message = getattr(error, "message", None) or str(error)
        raise TabconsInputError(f"cannot read the model files at {location}: {message}") from None
