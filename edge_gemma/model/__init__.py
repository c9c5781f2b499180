"""The one eager PyTorch definition of Gemma 4 (text decoder, vision encoder, audio encoder)."""
