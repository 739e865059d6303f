"""Probes in the training loops users already run: `lightning.ProbeCallback` (PyTorch Lightning) and
`hf.ProbeCallback` (the HuggingFace Trainer). Import the submodule you need; each imports its framework
(the extras `batchscope[lightning]` and `batchscope[hf]`) and fails in one line naming the extra without it."""
