"""nlpctr: cascaded vs joint NLP features for CTR models."""

__version__ = "0.1.0"
