"""Training recipes: one loop (loop.py: DDP/FSDP2, checkpoints and resume, throughput), one data
pipeline (data.py: files, datasets, chats, mixing), evaluation during training (evaluate.py), one
objective per method (ar.py, tidar.py, block_diffusion.py, eagle_head.py)."""
