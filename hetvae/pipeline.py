"""hetvae's ``AutoencoderKL`` as a diffusers pipeline component that nothing drops.

diffusers accepts a component passed to ``DiffusionPipeline.from_pretrained(..., vae=...)`` only
if its class derives from the base class of the one ``model_index.json`` names (``ModelMixin`` for
a VAE), and ``pipe.save_pretrained`` saves only components deriving from a base class it knows
(``ModelMixin``, ...). It records a component's class as ``[module, class name]``; loading the
pipeline back looks the class up in that module, which must already be imported (diffusers
imports no module a repository names), and finds the load method through the ``ModelMixin`` name
in that module: hence the ``ModelMixin`` import below, which is what diffusers looks up.

:class:`PipelineAutoencoderKL` is hetvae's :class:`~hetvae.autoencoder.AutoencoderKL` (same
weights, head, calibration, ``decode(z).log_scale``) and a ``diffusers.ModelMixin``:

- ``from_pretrained(repo, vae=PipelineAutoencoderKL.from_model(ae))`` passes diffusers' check;
- ``pipe.save_pretrained(out)`` writes ``out/vae`` in the diffusers format (which stock diffusers
  also reads), the head beside it (``log_scale_head.safetensors``) and the likelihood with any
  calibration in its ``config.json``; ``model_index.json`` records
  ``"vae": ["hetvae.pipeline", "PipelineAutoencoderKL"]``;
- ``import hetvae.pipeline`` and then ``DiffusionPipeline.from_pretrained(out)`` gives it back, with
  the same weights, head and calibration (``torch_dtype`` applies to it too).

diffusers logs that the VAE's type is not the ``AutoencoderKL`` its pipeline's signature names; the
pipeline uses it all the same (it has diffusers' ``encode`` / ``decode`` face).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hetvae.autoencoder import AutoencoderKL

try:
    # the name diffusers looks up in this module when it loads a pipeline that records our class
    from diffusers import ModelMixin
except ImportError as e:  # pragma: no cover - diffusers is optional
    raise ImportError("hetvae.pipeline puts hetvae's VAE into diffusers pipelines: pip install diffusers") from e

__all__ = ["ModelMixin", "PipelineAutoencoderKL"]


class PipelineAutoencoderKL(AutoencoderKL, ModelMixin):
    """hetvae's ``AutoencoderKL`` that diffusers pipelines accept, save and load (module docstring).

    ``PipelineAutoencoderKL.from_model(ae)``: a copy of any hetvae ``AutoencoderKL`` (weights,
    head, calibration, switches such as tiling and ``use_calibration``).
    ``PipelineAutoencoderKL.from_pretrained(name, ...)``: as ``hetvae.AutoencoderKL.from_pretrained``
    (a local model or a Hub id, ``subfolder``, ``revision``, ``variant``, ``torch_dtype``, ...).
    ``save_pretrained(dir)`` writes the diffusers format by default (``format=`` as hetvae's).
    """

    @classmethod
    def from_model(cls, model: AutoencoderKL) -> PipelineAutoencoderKL:
        """A copy of ``model`` as a :class:`PipelineAutoencoderKL` (``model`` is left as it is)."""
        if not isinstance(model, AutoencoderKL):
            raise TypeError(f"model must be a hetvae AutoencoderKL, got {type(model).__name__}")
        return cls._adopt(copy.deepcopy(model))

    @classmethod
    def _adopt(cls, model: AutoencoderKL) -> PipelineAutoencoderKL:
        # The same object, now of this class: AutoencoderKL's state is all there, and ModelMixin's
        # __init__ adds only the attribute set here.
        model.__class__ = cls
        model._gradient_checkpointing_func = None
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, log_scale: str | None = None, **kwargs: Any) -> PipelineAutoencoderKL:
        """``hetvae.AutoencoderKL.from_pretrained`` (the arguments diffusers' pipeline loader passes
        included), as a :class:`PipelineAutoencoderKL`."""
        return cls._adopt(AutoencoderKL.from_pretrained.__func__(AutoencoderKL, path, log_scale, **kwargs))

    def save_pretrained(
        self,
        path: str | Path,
        format: str = "diffusers",
        *,
        likelihood: Any = None,
        overwrite: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> Path:
        """hetvae's ``save_pretrained``, in the diffusers format unless ``format`` says otherwise:
        what ``pipe.save_pretrained`` calls for the pipeline's ``vae`` folder (diffusers passes the
        ``safe_serialization`` and ``variant`` it was given)."""
        return AutoencoderKL.save_pretrained(
            self, path, format, likelihood=likelihood, overwrite=overwrite, safe_serialization=safe_serialization,
            variant=variant,
        )
