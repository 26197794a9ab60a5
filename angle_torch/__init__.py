"""angle_torch: the PyTorch reference AnglE model — backbone + pooling, its settings, LoRA
merge and the STS metric. Training fine-tunes it, the exporter traces it and gates every
artifact against it; the runtime (angle_rt) never imports it."""
