"""tailor: adapt an open language model to your task on one machine."""
__version__ = "0.1.0"
