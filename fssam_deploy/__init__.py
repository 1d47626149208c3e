"""fssam-deploy: FSSAM (few-shot segmentation with SAM 2) from checkpoint to fast inference."""

from fssam_deploy.errors import CheckpointError, ConfigError, EngineError, FSSAMError, InputError
from fssam_deploy.model import FSSAMConfig, Pipeline, SupportSession

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "EngineError", "FSSAMConfig", "FSSAMError", "InputError",
           "Pipeline", "SupportSession", "__version__"]
