"""hetvae: heteroscedastic (spatially varying) reconstruction likelihoods for image autoencoders."""

__version__ = "0.1.0"
