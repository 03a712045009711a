"""Modules: quantized and LoRA linear layers."""
