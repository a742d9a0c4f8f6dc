"""zoo.multimodal: pipelines built on open_clip, diffusers and transformers (imported on demand)."""
