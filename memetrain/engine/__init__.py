"""The training engine: one loop over Accelerate (DDP, DeepSpeed, AMP), checkpoints, logging."""
