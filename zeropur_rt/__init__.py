"""zeropur_rt: deploy-time runtime for ZeroPur. Importing it pulls in numpy only; backends import lazily."""
from zeropur_rt.config import ZeroPurConfig, preset
from zeropur_rt.manifest import ArtifactError, load_manifest
from zeropur_rt.pipeline import Purifier

__all__ = ["ArtifactError", "Purifier", "ZeroPurConfig", "load_manifest", "preset"]
__version__ = "0.1.0"
