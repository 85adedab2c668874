"""HART (mit-han-lab/hart): text-to-image next-scale prediction with a text prefix in the KV cache
and a diffusion head for the continuous residual of the last scale."""
