"""ember-train: train text-embedding models the way ember-v1 was made."""

from ember_train.models import Encoder

__version__ = "0.1.0"
__all__ = ["Encoder", "__version__"]
