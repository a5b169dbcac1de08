"""The engine that fuses one generation: LoRA deltas, the pair kernels and parts, the policies, the divergence and
the decisions, the session that hooks a model's layers. It imports nothing of hosts/, guidance/, quality/, bench/ or
loras/: every host and tool drives it, never the other way round."""
