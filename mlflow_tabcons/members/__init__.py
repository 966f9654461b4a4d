"""The fine-tuned members: the classifier around a Hugging Face checkpoint, LoRA wiring, and the ensemble trainer."""
