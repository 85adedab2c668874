"""VAREdit (HiDream-ai/VAREdit): Infinity fine-tuned for instruction-based image editing. The
source image's VAE features are a slot of the KV cache before scale 0; its blocks, VAE, codes and
text encoder are Infinity's."""
