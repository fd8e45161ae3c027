"""Build-time tool: Hugging Face MoE checkpoint directory -> `.zmoe` archive."""
__version__ = "0.1.0"
