"""Controllers: per-request knob selection under a latency budget (the interface is `base.Controller`).

`LOADERS` is the registry of controller kinds: an artifact's `kind` names the function that turns the
(checked) artifact into a controller for the loaded model. Adding a controller is one module with a
`from_artifact(artifact, model)` and one line here.

Shipped artifacts (made for the embedded default model) are package data; `artifact_folders` lists where
`controller=<kind>` looks for one made for the loaded model: the checkpoint's own `controllers/` folder,
then the shipped ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmms_adaptive.controllers import grpo, lookup, static
from lmms_adaptive.controllers.base import ArtifactError, Controller, Model, read_artifact

LOADERS: dict[str, Callable[[dict[str, Any], Model], Controller]] = {
    "static": static.from_artifact,
    "lookup": lookup.from_artifact,
    "grpo": grpo.from_artifact,
}

# The top-level `controllers/` folder of the repository; pyproject maps it to `lmms_adaptive/artifacts/` in a wheel.
_PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED_ARTIFACTS = next(
    (p for p in (_PACKAGE / "artifacts", _PACKAGE.parent / "controllers") if p.is_dir()), _PACKAGE / "artifacts"
)


def artifact_folders(checkpoint: Path | None) -> list[Path]:
    """Where a controller kind's artifact is looked for: `<checkpoint>/controllers/`, then the shipped ones."""
    return [p for p in (checkpoint and checkpoint / "controllers", SHIPPED_ARTIFACTS) if p is not None]


def find_artifact(kind: str, model_fingerprint: str, folders: list[Path]) -> Path | None:
    """The first `*.json` artifact of `kind` made for this model in `folders` (in order, files sorted by name)."""
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                head = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (
                isinstance(head, dict)
                and head.get("kind") == kind
                and head.get("model_fingerprint") == model_fingerprint
            ):
                return path
    return None


def load_controller(artifact: dict[str, Any], model: Model) -> Controller:
    """The controller of an artifact already checked by `read_artifact`."""
    kind = artifact["kind"]
    if kind not in LOADERS:
        raise ArtifactError(
            f"controller artifact of kind {kind!r} is not supported by this version (known: {', '.join(LOADERS)})"
        )
    return LOADERS[kind](artifact, model)


def controller_from_file(path: str | Path, model: Model) -> Controller:
    """Read, check and load a controller artifact file for the loaded model."""
    return load_controller(read_artifact(path, model.model_id, model.knobs), model)


def load(name: str | Path, model: Model) -> Controller:
    """`name` is a controller kind (`lookup`, `grpo`, ...: the artifact of that kind made for the loaded model,
    looked up in `artifact_folders(model.folder)`) or the path of an artifact file."""
    if str(name) in LOADERS:
        folders = artifact_folders(model.folder)
        path = find_artifact(str(name), model.model_id, folders)
        if path is None:
            raise FileNotFoundError(
                f"controller={name!r}: no {name} artifact for this model (fingerprint {model.model_id}) in "
                f"{', '.join(map(str, folders))}: build one (profiling / training) and pass its path"
            )
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"controller must be one of {', '.join(LOADERS)} or a controller artifact file, got {str(name)!r}"
            )
    return controller_from_file(path, model)
