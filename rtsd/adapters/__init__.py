"""Files that adapt a loaded model without re-export: textual-inversion embeddings (embeddings.py)."""
