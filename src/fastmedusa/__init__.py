"""fastmedusa: train Medusa decoding heads cheaply and decode faster with them."""

from fastmedusa.model import MedusaConfig, MedusaModel

__version__ = "0.1.0"
__all__ = ["MedusaConfig", "MedusaModel", "__version__"]
