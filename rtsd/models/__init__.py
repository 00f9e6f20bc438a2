"""PyTorch reference networks of Stable Diffusion (needs torch: ``pip install 'rtsd[export]'``).

``load_checkpoint(path)`` -> ReferenceModels with ``.config``, ``.unet``, ``.vae``, ``.text_encoder``, ``.tokenizer``.
Module attribute names mirror the LDM single-file checkpoint keys; loading is strict.
"""

from rtsd.models.loading import COMPONENT_PREFIXES, ReferenceModels, build_models, load_checkpoint, load_state

__all__ = ["COMPONENT_PREFIXES", "ReferenceModels", "build_models", "load_checkpoint", "load_state"]
