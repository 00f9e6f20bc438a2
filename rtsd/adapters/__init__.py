"""Adapters applied to a base checkpoint's weights: LoRA files (lora.py)."""
