"""Adapters applied to a base checkpoint's weights or inputs: LoRA files (lora.py), textual-inversion embeddings
(embeddings.py)."""
