"""Adapters in other libraries' formats: Hugging Face peft (and diffusers' LoRA file), both ways.

`peft.py` holds the folder layout and the dispatch; one codec file per peft adapter type says how
its tensors and options map onto a peftvision method, or why they cannot.
"""
