"""zeropur_rt: deploy-time runtime for ZeroPur. Importing it pulls in numpy only."""
from zeropur_rt.config import ZeroPurConfig, preset

__all__ = ["ZeroPurConfig", "preset"]
__version__ = "0.1.0"
