"""Entry point for lmms-eval's `lmms_eval.models` group.

Loaded while `lmms_eval.models` is still initialising, so it imports only the registry and names the
model class by its path (imported later, when `--model adaptive_molmoe` is asked for).
"""

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list[ModelManifest]:
    return [
        ModelManifest(
            model_id="adaptive_molmoe", simple_class_path="lmms_adaptive.integration.lmms_plugin.AdaptiveMolmoeLMM"
        )
    ]
