"""recipe-dist: RECIPE backdoor purification of pre-trained models, as cluster software."""

__version__ = "0.1.0"
