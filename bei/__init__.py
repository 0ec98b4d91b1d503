"""bei: an engine builder and runtime for embedding, reranking, classification and NER models."""

__version__ = "0.1.0"
