"""Training recipes: one loop (loop.py), one data pipeline (data.py), one objective per method
(tidar.py, block_diffusion.py, eagle_head.py)."""
