"""genlab: train, sample and evaluate image generative models with Lightning + Hydra."""

from genlab.utils import resolvers
from genlab.utils.checkpoint import load

resolvers.register()  # ${run_id:} and ${process_suffix:} of conf/hydra/default.yaml

__all__ = ["load"]
__version__ = "0.1.0"
