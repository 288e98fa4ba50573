"""Fine-tuning (LoRA/QLoRA), merging and evaluation, each run as a task (see docs/training.md)."""
